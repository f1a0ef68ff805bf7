"""One process of the multi-host test (tests/test_multihost.py): trains the small text model
of configs/base.py through `train.train_and_evaluate`, or restores a checkpoint.

    python tests/multihost_worker.py train WORKDIR DATA_DIR STEPS [PROCESS_ID NUM_PROCESSES PORT]
    python tests/multihost_worker.py restore CHECKPOINTS_A CHECKPOINTS_B DATA_DIR

Every process has 4 CPU devices when it is one of several, 8 alone (the XLA flag is set here,
before jax is imported). `restore` (one process) restores both checkpoint directories' newest
train state and prints the largest parameter difference as JSON.
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = int(sys.argv[6]) if sys.argv[1] == "train" and len(sys.argv) > 6 else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // NUM_PROCESSES}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, REPO)

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

SMALL = {
    "model.llm": dict(width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mrope_sections=(2, 3, 3),
                      mlp_dim=128, vocab_size=512),
    "data.sources.text": dict(num_docs=400, tokenizer_docs=400),
    "data": dict(seq_len=64, shards=2),  # two data shards: one per process, or both in one process
    "train": dict(batch_size=8, log_every=1),
    "tokenizer": dict(vocab_size=512),
    "checkpoint": dict(every=1000, async_save=True),
    "opt": dict(decay="constant", warmup_steps=3, peak_lr=1e-2),
}


def small_config(data_dir: str, steps: int = 1):
    from configs import base
    config = base.get_config()  # model.kind "llm" on the built-in text corpus
    for path, values in SMALL.items():
        section = config
        for name in path.split("."):
            section = section[name]
        section.update(values)
    config.data.dir = data_dir
    config.tokenizer.cache_dir = os.path.join(data_dir, "tokenizer")
    config.train.steps = steps
    return config


def train(workdir: str, data_dir: str, steps: int) -> None:
    from m2omni_jax import train as train_lib
    from m2omni_jax.run_config import RunConfig
    train_lib.train_and_evaluate(RunConfig.of(small_config(data_dir, steps)), workdir)


def restore(checkpoints_a: str, checkpoints_b: str, data_dir: str) -> None:
    import numpy as np

    from m2omni_jax import build
    from m2omni_jax.data import tokenizer as tokenizer_lib
    from m2omni_jax.parallel import sharding
    from m2omni_jax.training import checkpointing, train_step

    from m2omni_jax.run_config import RunConfig
    config = build.validate_config(RunConfig.of(small_config(data_dir)), jax.device_count(), 1)
    mesh = sharding.make_mesh(config.mesh)
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer_lib.get_tokenizer(config))
    _, abstract, shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES, shapes,
                                                           config.seed)
    abstract = build.abstract_state_with(abstract, shardings)
    states = []
    for directory in (checkpoints_a, checkpoints_b):
        with checkpointing.Checkpointer(directory, save_every=1000, keep=1, async_save=False) as ckpt:
            states.append(ckpt.restore(abstract)[0])
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         states[0].params, states[1].params))
    print(json.dumps({"steps": [int(s.step) for s in states], "max_param_diff": max(diffs),
                      "devices": jax.device_count()}))


def main(argv):
    import m2omni_jax.experiments  # noqa: F401  (registers the built-in sources, as cli.py does)
    if argv[1] == "restore":
        restore(*argv[2:5])
        return
    workdir, data_dir, steps = argv[2], argv[3], int(argv[4])
    if NUM_PROCESSES > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{argv[7]}", num_processes=NUM_PROCESSES,
                                   process_id=int(argv[5]))
    train(workdir, data_dir, steps)


if __name__ == "__main__":
    main(sys.argv)
