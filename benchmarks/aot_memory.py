"""Sizes a config for a TPU slice without one: `m2omni-aot` (m2omni_jax/aot.py), kept under
its old name for the commands in docs and issues.

    pip install libtpu   # beside jax; lets this CPU machine compile for TPUs
    python benchmarks/aot_memory.py --config=configs/m2omni_9b.py --topology=v5p-64 --json=9b.json
    python benchmarks/aot_memory.py --config=configs/m2omni_72b.py --topology=v5p-512

Results: benchmarks/results/aot_*.json (per-chip arguments, temporaries, outputs, the peak
against the chip's HBM, the margin, the memory choices).
"""
from m2omni_jax import aot

if __name__ == "__main__":
    aot.run()
