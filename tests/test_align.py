"""The alignment stage end to end: previous stage's checkpoint -> LoRA + DPO steps -> resume."""
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import optax

from m2omni_jax import align
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step
from m2omni_jax.training.metrics_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs.stages import alignment  # noqa: E402

SMALL_LLM = dict(width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mrope_sections=(2, 3, 3),
                 mlp_dim=128)


def small_config(tmp_path, steps):
    config = alignment.get_config("tiny")
    config.model.llm.update(SMALL_LLM)
    config.data.dir = str(tmp_path / "data")
    config.tokenizer.cache_dir = str(tmp_path / "tokenizer")
    config.data.seq_len = 64
    config.alignment.batch_size = 8
    config.train.steps = steps
    config.train.log_every = 1
    config.checkpoint.every = 2
    config.opt.update(dict(warmup_steps=1, decay="constant", peak_lr=3e-3))
    return config


def write_previous_stage(config, workdir):
    """An omni-style checkpoint: the LLM's params under `llm/`."""
    mesh = sharding.make_mesh(config.mesh)
    model = LLM(LLMConfig.from_config(config.model.llm))
    params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    tx = optax.adam(1e-3)
    state = train_step.TrainState(step=np.int32(5), params={"llm": params, "vision": {"w": np.ones(3, np.float32)}},
                                  opt_state=tx.init({"llm": params}), rng=np.zeros(2, np.uint32), tx=tx)
    state = jax.device_put(state, sharding.replicated(mesh))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
    ckpt.save(5, state, force=True)
    ckpt.close()
    return params


def test_alignment_trains_lora_from_previous_stage_and_resumes(tmp_path):
    base_params = write_previous_stage(small_config(tmp_path, 1), tmp_path / "it3")
    workdir = str(tmp_path / "align")
    final = align.align(small_config(tmp_path, 4), workdir)
    assert 0.0 <= final["eval/reward_accuracy"] <= 1.0 and np.isfinite(final["eval/loss"])
    first = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert sorted(first) == [1, 2, 3, 4]
    assert first[4]["reward_margin"] > first[1]["reward_margin"]  # preferences are being learned

    # Resume for 2 more steps: continues from the saved LoRA state, base untouched.
    align.align(small_config(tmp_path, 6), workdir)
    assert sorted(read_metrics(os.path.join(workdir, "metrics.jsonl"))) == [1, 2, 3, 4, 5, 6]
    state_dir = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=3)
    assert state_dir.latest_step() == 6
    state_dir.close()
    assert base_params["embedding"].shape == (1024, 64)
