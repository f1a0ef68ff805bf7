"""`m2omni-aot`: will a config's train step fit a TPU slice? Compiled ahead of time, no TPU needed.

    pip install libtpu   # lets this (CPU) machine compile for TPUs
    m2omni-aot --config=configs/m2omni_9b.py --topology=v5p-64 [--json=out.json] [--config.train.batch_size=256]

Builds the train state abstractly (no parameter is allocated), lowers the same jitted,
sharded step `m2omni-train` runs (the omni model with its vision and audio towers,
connector and LLM, on batches of the config's patch packs and clip slots) onto the
topology's devices and reports XLA's per-chip memory: arguments (parameters, optimizer
state, the batch), outputs, temporaries, and the peak against the chip's HBM. Exit 0 when
the peak leaves `--margin` of the HBM free; otherwise 1, with what to change (remat
policy, LM-head chunking, mesh axes, batch) as the last lines. `--num_slices` > 1 sizes a
multislice run: set `config.mesh.dcn` to match.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
NAME = "m2omni-aot"

GIB = 1024 ** 3
# Per-chip HBM by TPU generation (Cloud TPU system architecture pages).
# v5p: libtpu's own figure ("available HBM (95.73G)" in its out-of-memory message).
HBM_GIB = {"v4": 32.0, "v5p": 95.73, "v5e": 16.0, "v5litepod": 16.0, "v6e": 32.0}
# Cloud TPU accelerator types count TensorCores (2 per chip) on v4 / v5p, chips on v5e / v6e.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def topology_name(topology: str) -> str:
    """"v5p-64" -> "v5p:2x4x4" (32 chips); "kind:shape" is taken as it is."""
    if ":" in topology:
        return topology
    kind, _, count = topology.rpartition("-")
    if kind not in CORES_PER_CHIP or not count.isdigit():
        raise ValueError(f"--topology={topology!r}: use an accelerator type such as v5p-64, v5litepod-16, "
                         f"v6e-64 ({sorted(CORES_PER_CHIP)}) or kind:shape such as v5p:2x4x4")
    chips = int(count) // CORES_PER_CHIP[kind]
    shapes = SHAPES_3D if kind in ("v4", "v5p") else SHAPES_2D
    if chips not in shapes:
        raise ValueError(f"--topology={topology!r}: {chips} chips is not a slice shape we know "
                         f"({sorted(shapes)}); give it as {kind}:AxBxC")
    return f"{'v5e' if kind == 'v5litepod' else kind}:{shapes[chips]}"


def topology_devices(topology: str, num_slices: int = 1):
    """The devices of `num_slices` slices of a TPU topology, compiled for on this machine
    (libtpu; no TPU needed)."""
    from jax.experimental import topologies
    name = topology_name(topology)
    shape = name.partition(":")[2].split("x")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=(2, 2, 1) if len(shape) == 3 else (2, 2),
                                            num_slices=num_slices)
    except Exception as e:  # no libtpu, or a topology it does not know
        raise RuntimeError(f"cannot compile for {name!r} here ({e}); `pip install libtpu` beside jax") from e
    return desc.devices


def hbm_gib(topology: str, override: float = 0.0) -> float:
    if override > 0:
        return override
    kind = topology_name(topology).partition(":")[0]
    if kind not in HBM_GIB:
        raise ValueError(f"no HBM size known for {kind!r}; pass --hbm_gib")
    return HBM_GIB[kind]


def build_model(config):
    """The LLM, or the omni model with its towers. The special-token ids are placeholders
    (the last ids of the vocabulary): which tokens the towers fill changes no shape."""
    from m2omni_jax.models import omni
    from m2omni_jax.models.llm import LLM, LLMConfig
    if not omni.is_omni(config):
        return LLM(LLMConfig.from_config(config.model.llm))
    vocab = config.model.llm.vocab_size
    omni_config = omni.OmniConfig.from_config(config.model, (vocab - 2, vocab - 3), audio_placeholder_id=vocab - 4,
                                              end_of_audio_id=vocab - 5)
    if config.model.connector.extras:
        raise ValueError(f"model.connector.extras={config.model.connector.extras!r}: an experiment's plug-in "
                         "needs its tokenizer; size the config without it")
    return omni.OmniModel(omni_config)


def abstract_step(config, mesh, rules):
    """(the jitted step, its abstract arguments with shardings, the model)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from m2omni_jax import build
    from m2omni_jax.modalities import NUM_MODALITIES
    from m2omni_jax.parallel import sharding
    from m2omni_jax.training import optimizers, train_step
    model = build_model(config)
    shapes, keys = build.example_batch_shapes(config), build.batch_keys(config)
    params = nn.unbox(train_step.abstract_boxed_params(model, shapes))
    tx = optimizers.make_optimizer(config.opt, config.train.steps, params)
    abstract, shardings = train_step.state_shardings(model, tx, mesh, rules, shapes)
    frozen = optimizers.frozen_mask(config.opt, params) if config.opt.frozen else None
    step = train_step.jit_train_step(model, mesh, rules, shardings, z_loss_weight=config.train.z_loss_weight,
                                     batch_keys=keys, frozen=frozen)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_shardings = train_step.batch_shardings(mesh, keys)
    batch = {k: jax.ShapeDtypeStruct(*batch_shape(config, shapes, k), sharding=batch_shardings[k]) for k in keys}
    weights = jax.ShapeDtypeStruct((NUM_MODALITIES,), jnp.float32, sharding=sharding.replicated(mesh))
    return step, (state, batch, weights), model


def batch_shape(config, shapes, key):
    """(shape, dtype) of a batch key: the omni pipeline's, or the text pipeline's."""
    import jax.numpy as jnp
    from m2omni_jax.models import omni
    if omni.is_omni(config):
        return shapes[key].shape, shapes[key].dtype
    rows, length = config.train.batch_size, config.data.seq_len
    return ((rows, 3, length) if key == "positions" else (rows, length)), (
        jnp.float32 if key == "loss_mask" else jnp.int32)


def size(config, topology: str, num_slices: int = 1, hbm: float = 0.0, margin: float = 0.10) -> dict:
    """Compiles the config's train step for the topology; per-chip memory and whether it fits."""
    from m2omni_jax.parallel import sharding
    devices = topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    step, args, model = abstract_step(config, mesh, rules)
    start = time.perf_counter()
    per_chip = compiled_memory(step, args, mesh, rules)
    per_chip["peak_gib"] = (per_chip["arguments_gib"] + per_chip["outputs_gib"] - per_chip["aliased_gib"]
                            + per_chip["temporaries_gib"] + per_chip["generated_code_gib"])
    capacity = hbm_gib(topology, hbm)
    result = {"topology": topology_name(topology), "num_slices": num_slices, "chips": len(devices),
              "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "model": config.model.kind,
              "params_billion": num_params(args[0].params) / 1e9,
              "batch": [config.train.batch_size, config.data.seq_len], "per_chip_memory": per_chip,
              "hbm_gib": capacity, "margin": 1.0 - per_chip["peak_gib"] / capacity, "required_margin": margin,
              "compile_seconds": time.perf_counter() - start, "choices": choices(config, mesh),
              "largest_activations_gib": largest_activations(config, mesh)}
    result["fits"] = result["margin"] >= margin
    if not result["fits"]:
        result["advice"] = advice(config, mesh, result)
    return result


def compiled_memory(step, args, mesh, rules) -> dict:
    """Per-chip GiB from XLA's memory analysis. When the TPU compiler itself refuses (its
    temporaries exceed the chip's HBM), the temporaries it names and the arguments' shards."""
    from m2omni_jax.parallel import sharding
    try:
        with sharding.activate(mesh, rules):
            memory = step.jitted.lower(*args).compile().memory_analysis()
    except Exception as e:  # jax's XlaRuntimeError: RESOURCE_EXHAUSTED ... CompileTimeHbmOom
        found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])", str(e))
        if not found:
            raise
        state_gib = shard_gib(args[0])
        return {"arguments_gib": shard_gib(args), "outputs_gib": state_gib, "aliased_gib": state_gib,
                "temporaries_gib": float(found.group(1)) * 1024.0 ** "KMGT".index(found.group(2)) / 1024 ** 2,
                "generated_code_gib": 0.0, "compiler_refused": True}
    return {"arguments_gib": memory.argument_size_in_bytes / GIB, "outputs_gib": memory.output_size_in_bytes / GIB,
            "temporaries_gib": memory.temp_size_in_bytes / GIB, "aliased_gib": memory.alias_size_in_bytes / GIB,
            "generated_code_gib": memory.generated_code_size_in_bytes / GIB}


def shard_gib(tree) -> float:
    """GiB of one device's shards of a tree of sharded ShapeDtypeStructs."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)) / GIB


def num_params(params) -> int:
    import jax
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def choices(config, mesh) -> dict:
    """The memory choices the figures depend on."""
    model = config.model
    out = {"llm.remat_policy": model.llm.remat_policy, "llm.lm_head_chunk": model.llm.lm_head_chunk,
           "llm.attention_implementation": model.llm.attention_implementation, "opt.mu_dtype": config.opt.mu_dtype,
           "rows_per_chip": config.train.batch_size / batch_ways(mesh)}
    if model.kind == "omni":
        out.update({"vision.remat_policy": model.vision.remat_policy,
                    "data.vision.patches_per_row": config.data.vision.patches_per_row})
        if model.audio.enabled:
            out["audio.remat_policy"] = model.audio.remat_policy
    return out


def batch_ways(mesh) -> int:
    from m2omni_jax.parallel import sharding
    return sharding.batch_axis_size(mesh)


def largest_activations(config, mesh) -> dict:
    """Per-chip GiB of the largest single activations, by formula: the fp32 attention scores
    of one layer (batch rows × heads × length², the einsum / xla attention) and the fp32
    logits (whole, or one chunk)."""
    rows = config.train.batch_size / batch_ways(mesh)
    tensor = mesh.shape["tensor"]
    llm, length = config.model.llm, config.data.seq_len
    head_chunk = llm.lm_head_chunk or length
    out = {"llm_attention_scores": rows * math.ceil(llm.num_heads / tensor) * length ** 2 * 4 / GIB,
           "logits": rows * min(head_chunk, length) * math.ceil(llm.vocab_size / tensor) * 4 / GIB}
    if config.model.kind == "omni":
        vision, pack = config.model.vision, config.data.vision.patches_per_row
        out["vision_attention_scores"] = rows * math.ceil(vision.num_heads / tensor) * pack ** 2 * 4 / GIB
    return out


def advice(config, mesh, result) -> list[str]:
    """What to change, biggest lever first, each with its figure."""
    lines, model = [], config.model
    activations = result["largest_activations_gib"]
    capacity, mem = result["hbm_gib"], result["per_chip_memory"]
    for name in ("llm", "vision", "audio"):
        section = getattr(model, name)
        if (name == "llm" or model.kind == "omni") and section.remat_policy != "full" and (
                name != "audio" or model.audio.enabled):
            lines.append(f"config.model.{name}.remat_policy={section.remat_policy!r}: 'full' keeps one "
                         "activation per layer")
    if not model.llm.lm_head_chunk and activations["logits"] > 0.02 * capacity:
        lines.append(f"config.model.llm.lm_head_chunk=512: the whole fp32 logits are {activations['logits']:.1f} "
                     "GiB/chip")
    for key, field in (("llm_attention_scores", "data.seq_len"), ("vision_attention_scores",
                                                                  "data.vision.patches_per_row")):
        if activations.get(key, 0.0) > 0.1 * capacity:
            lines.append(f"{key.replace('_', ' ')}: {activations[key]:.1f} GiB/chip per layer (rows × heads × "
                         f"length², fp32): fewer rows per chip (train.batch_size), a shorter config.{field}, "
                         "or a blocked attention kernel")
    if mem["arguments_gib"] > 0.3 * capacity:
        lines.append(f"parameters + optimizer state {mem['arguments_gib']:.1f} GiB/chip: shard them wider "
                     f"(config.mesh.fsdp, config.mesh.tensor; now {dict(mesh.shape)}) or opt.mu_dtype='bfloat16'")
    rows = config.train.batch_size / batch_ways(mesh)
    budget = capacity * (1 - result["required_margin"]) - mem["arguments_gib"]
    fitting_rows = int(rows * budget / mem["temporaries_gib"]) if mem["temporaries_gib"] > 0 else 0
    if 0 < fitting_rows < rows:
        lines.append(f"temporaries scale with the rows per chip ({rows:g}): about {fitting_rows} fit, "
                     f"config.train.batch_size={fitting_rows * batch_ways(mesh)}")
    elif fitting_rows == 0 and rows >= 1:
        lines.append("even one row per chip does not fit: shorten the rows or shard activations (config.mesh.tensor)")
    return lines


def report(result) -> str:
    mem = result["per_chip_memory"]
    verdict = "fits" if result["fits"] else "does NOT fit"
    return (f"{result['params_billion']:.2f}B-parameter {result['model']} step on {result['chips']} × "
            f"{result['device_kind']} ({result['topology']}, {result['num_slices']} slice(s)), mesh {result['mesh']}: "
            f"per chip {mem['peak_gib']:.1f} of {result['hbm_gib']:.1f} GiB (arguments {mem['arguments_gib']:.1f}, "
            f"temporaries {mem['temporaries_gib']:.1f}, outputs {mem['outputs_gib']:.1f}, aliased "
            f"{mem['aliased_gib']:.1f}); margin {100 * result['margin']:.0f}% — {verdict} "
            f"(required {100 * result['required_margin']:.0f}%)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology, run nothing here
    # Compiling touches no TPU: do not wait for (or take) libtpu's one-process lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import m2omni_jax.experiments  # noqa: F401  (sources and plug-ins a config may name)
    from m2omni_jax.faults import ConfigError
    from m2omni_jax.run_config import RunConfig
    try:
        config = RunConfig.of(FLAGS.config)
        result = size(config, FLAGS.topology, FLAGS.num_slices, FLAGS.hbm_gib, FLAGS.margin)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)
    print(report(result))
    if not result["fits"]:
        print(f"{NAME}: does not fit; change:\n  " + "\n  ".join(result["advice"]), file=sys.stderr)
        sys.exit(1)


def define_flags():
    """The command's flags, defined when it runs (not on import: cli.py's --config lives in
    the same absl registry when a test imports both)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", "v5p-64", "Cloud TPU accelerator type (v5p-64, v5litepod-16, v6e-64, "
                        "v4-32) or kind:shape (v5p:2x4x4).")
    flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN; config.mesh.dcn must span them).")
    flags.DEFINE_float("hbm_gib", 0.0, "Per-chip HBM in GiB; 0: the TPU generation's (HBM_GIB).")
    flags.DEFINE_float("margin", 0.10, "Fraction of the HBM the peak must leave free.")
    flags.DEFINE_string("json", "", "Also write the result here as JSON.")
    flags.mark_flags_as_required(["config"])


def run():
    define_flags()
    logging.set_verbosity(logging.WARNING)
    if any(arg in ("-h", "--help", "-?") for arg in sys.argv[1:]):
        print(f"{NAME} --config=CONFIG --topology=v5p-64 [--config.section.field=value ...]\n\n{__doc__.strip()}\n")
        print(FLAGS.module_help(__name__))
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    run()

