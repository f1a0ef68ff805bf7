"""m2omni-aot: accelerator types to topologies, and a tiny config compiled for a TPU slice on
this CPU (libtpu), one slice and two (multislice: config.mesh.dcn)."""
import os
import subprocess
import sys

import pytest

from configs import tiny
from m2omni_jax import aot
from m2omni_jax.config_fields import replace
from m2omni_jax.run_config import RunConfig


def test_accelerator_types_name_their_topologies():
    assert aot.topology_name("v5p-64") == "v5p:2x4x4"  # 64 TensorCores = 32 chips
    assert aot.topology_name("v5p-512") == "v5p:4x8x8"
    assert aot.topology_name("v5litepod-16") == "v5e:4x4"  # v5e counts chips
    assert aot.topology_name("v6e:4x4") == "v6e:4x4"
    assert aot.hbm_gib("v5p-64") == 95.73 and aot.hbm_gib("v5p-64", 80.0) == 80.0
    with pytest.raises(ValueError, match="v5p-48.*24 chips"):
        aot.topology_name("v5p-48")
    with pytest.raises(ValueError, match="'tpu9-8'"):
        aot.topology_name("tpu9-8")


def test_command_names_a_bad_topology():
    run = subprocess.run([sys.executable, "-m", "m2omni_jax.aot", "--config=configs/tiny.py", "--topology=v5p-48"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("m2omni-aot: --topology='v5p-48'")


def small_config(**overrides):
    """A small text LLM: compiles for a TPU slice in seconds."""
    config = RunConfig.of(tiny.get_config())
    return replace(config, **{"model.kind": "llm", "model.llm.depth": 2, "train.batch_size": 8,
                              "data.seq_len": 128, **overrides})


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as m2omni-aot: no TPU is used


@pytest.mark.slow  # two TPU compiles: ~40 s on 2 shared cores
def test_tiny_step_sized_for_a_slice_and_for_two(libtpu):
    config = small_config(**{"mesh.data": 1, "mesh.fsdp": -1, "model.llm.lm_head_chunk": 32})
    result = aot.size(config, "v5p-8", hbm=1e-3)  # a 1 MiB chip: nothing fits
    mem = result["per_chip_memory"]
    assert result["chips"] == 4 and result["mesh"]["fsdp"] == 4
    assert 0 < mem["arguments_gib"] and 0 < mem["temporaries_gib"]
    assert mem["peak_gib"] >= mem["arguments_gib"] + mem["temporaries_gib"] - mem["aliased_gib"]
    assert not result["fits"] and result["margin"] < 0
    assert any("config.train.batch_size" in line or "one row per chip" in line for line in result["advice"])
    assert "does NOT fit" in aot.report(result)

    two = replace(config, **{"mesh.fsdp": -1, "mesh.dcn.data": 2})
    result = aot.size(two, "v5p-8", num_slices=2)
    assert result["chips"] == 8 and result["fits"]
    assert result["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
