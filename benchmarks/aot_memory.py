"""Sizes a config for a TPU slice without one: compiles its train step ahead of time.

    pip install libtpu   # beside jax; lets this CPU machine compile for TPUs
    python benchmarks/aot_memory.py --config=configs/m2omni_9b.py --topology=v5p:2x4x4 --json=9b.json
    python benchmarks/aot_memory.py --config=configs/m2omni_72b.py --topology=v5p:8x8x4

Builds the sharded train state abstractly (no parameter is allocated), lowers
the same jitted step `m2omni-train` runs onto a mesh of the topology's
devices, and prints per-chip memory (XLA's memory analysis) and the step's
FLOPs (XLA's cost analysis; compare with the model-FLOPs formula).
"""
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology; run nothing locally

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from m2omni_jax.modalities import NUM_MODALITIES  # noqa: E402
from m2omni_jax.models.llm import LLM, LLMConfig, training_flops_per_token  # noqa: E402
from m2omni_jax.parallel import sharding  # noqa: E402
from m2omni_jax.training import optimizers, train_step  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_string("topology", "v5p:2x4x4", "TPU topology name, e.g. v5p:2x4x4 (32 chips), v5e:4x4.")
flags.DEFINE_string("json", "", "Write the results here as JSON.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

GIB = 1024 ** 3


def topology_devices(name: str):
    kind, _, shape = name.partition(":")
    chips = [int(s) for s in shape.split("x")]
    host_bounds = (2, 2, 1) if len(chips) == 3 else (2, 2)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                        chips_per_host_bounds=host_bounds, num_slices=1)
    return desc.devices


def abstract_inputs(config, mesh, rules):
    model = LLM(LLMConfig.from_config(config.model.llm))
    shape = (config.train.batch_size, config.data.seq_len)
    params = nn.unbox(train_step.abstract_boxed_params(model, {"tokens": shape}))
    tx = optimizers.make_optimizer(config.opt, config.train.steps, params)
    abstract, shardings = train_step.state_shardings(model, tx, mesh, rules, {"tokens": shape})
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_shardings = train_step.batch_shardings(mesh)
    batch = {k: jax.ShapeDtypeStruct((shape[0], 3, shape[1]) if k == "positions" else shape,
                                     jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_shardings[k])
             for k in train_step.BATCH_KEYS}
    weights = jax.ShapeDtypeStruct((NUM_MODALITIES,), jnp.float32, sharding=sharding.replicated(mesh))
    return model, shardings, state, batch, weights


def size(config, topology: str) -> dict:
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    model, shardings, state, batch, weights = abstract_inputs(config, mesh, rules)
    step = train_step.jit_train_step(model, mesh, rules, shardings, z_loss_weight=config.train.z_loss_weight)
    with sharding.activate(mesh, rules):
        compiled = step.jitted.lower(state, batch, weights).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = config.train.batch_size * config.data.seq_len
    model_flops = training_flops_per_token(model.config, config.data.seq_len) * tokens
    per_chip = {
        "arguments_gib": memory.argument_size_in_bytes / GIB,
        "outputs_gib": memory.output_size_in_bytes / GIB,
        "temporaries_gib": memory.temp_size_in_bytes / GIB,
        "generated_code_gib": memory.generated_code_size_in_bytes / GIB,
        "aliased_gib": memory.alias_size_in_bytes / GIB,
    }
    per_chip["peak_estimate_gib"] = (per_chip["arguments_gib"] + per_chip["outputs_gib"]
                                     - per_chip["aliased_gib"] + per_chip["temporaries_gib"])
    return {
        "topology": topology, "chips": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape), "params_billion": model.config.num_params() / 1e9,
        "batch": [config.train.batch_size, config.data.seq_len], "per_chip_memory": per_chip,
        "xla_flops_per_chip_step": float(cost.get("flops", 0.0)),
        "model_flops_per_chip_step": model_flops / len(devices),
    }


def main(argv):
    del argv
    result = size(FLAGS.config, FLAGS.topology)
    mem = result["per_chip_memory"]
    print(f"{result['params_billion']:.2f}B params on {result['chips']} × {result['device_kind']} "
          f"mesh {result['mesh']}: per chip {mem['peak_estimate_gib']:.1f} GiB "
          f"(args {mem['arguments_gib']:.1f}, temps {mem['temporaries_gib']:.1f}); "
          f"XLA cost analysis {result['xla_flops_per_chip_step'] / 1e12:.0f} TFLOP/chip/step (a scanned layer body counted once) vs model "
          f"{result['model_flops_per_chip_step'] / 1e12:.0f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
