"""The alignment stage end to end, sharded over 8 devices: previous stage's checkpoint -> LoRA + DPO
steps (omni model with images; LLM alone for model.kind="llm") -> resume."""
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from m2omni_jax import align, build
from m2omni_jax.data import tokenizer as tokenizer_lib
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import checkpointing, train_step
from m2omni_jax.training.metrics_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs.stages import alignment  # noqa: E402

SMALL_LLM = dict(width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mrope_sections=(2, 3, 3),
                 mlp_dim=128)
SMALL_VISION = dict(width=16, depth=1, num_heads=2, out_width=16)


def small_config(tmp_path, steps, kind="omni"):
    config = alignment.get_config("tiny")
    config.model.kind = kind
    config.model.llm.update(SMALL_LLM)
    config.model.vision.update(SMALL_VISION)
    config.data.dir = str(tmp_path / "data")
    config.tokenizer.cache_dir = str(tmp_path / "tokenizer")
    config.data.seq_len = 96
    config.alignment.batch_size = 8
    config.train.batch_size = 8  # the previous stage's, for its example shapes
    config.train.steps = steps
    config.train.log_every = 1
    config.checkpoint.every = 2
    config.opt.update(dict(warmup_steps=1, decay="constant", peak_lr=3e-3))
    return config


def save_previous_stage(state, workdir):
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
    ckpt.save(5, state, force=True)
    ckpt.close()


def write_omni_stage(config, workdir):
    """A freshly initialised omni model (llm/, vision/, connector/, ...) as IT3's checkpoint."""
    model = build.build_model(config, tokenizer_lib.get_tokenizer(config))
    inputs = train_step.example_inputs(build.example_batch_shapes(config))
    key = jax.random.key(1, impl="rbg")  # compiles much faster than threefry on CPU
    params = jax.jit(lambda x: nn.unbox(model.init(key, **x)["params"]))(inputs)
    tx = optax.identity()  # the next stage reads the params only
    state = train_step.TrainState(step=np.int32(5), params=params, opt_state=tx.init(params),
                                  rng=np.zeros(2, np.uint32), tx=tx)
    save_previous_stage(jax.device_put(state, sharding.replicated(sharding.make_mesh(config.mesh))), workdir)
    return jax.tree.map(np.asarray, params)


def write_llm_stage(config, workdir):
    """An omni-style checkpoint holding the LLM's params under `llm/` (and a stand-in tower)."""
    mesh = sharding.make_mesh(config.mesh)
    model = LLM(LLMConfig.from_config(config.model.llm))
    params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    tx = optax.adam(1e-3)
    state = train_step.TrainState(step=np.int32(5), params={"llm": params, "vision": {"w": np.ones(3, np.float32)}},
                                  opt_state=tx.init({"llm": params}), rng=np.zeros(2, np.uint32), tx=tx)
    save_previous_stage(jax.device_put(state, sharding.replicated(mesh)), workdir)
    return params


def saved_alignment_state(config, workdir):
    """(the state align starts from, the state of the last alignment checkpoint)."""
    _, _, _, _, start, _ = align.build_alignment(config, workdir, tokenizer_lib.get_tokenizer(config))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), start)
    saved, _ = ckpt.restore(abstract)
    ckpt.close()
    return start, saved


@pytest.mark.slow
def test_omni_alignment_trains_only_lora_with_images_and_resumes(tmp_path):
    base = write_omni_stage(small_config(tmp_path, 1), tmp_path / "it3")
    workdir = str(tmp_path / "align")
    final = align.align(small_config(tmp_path, 3), workdir)
    assert 0.0 <= final["eval/reward_accuracy"] <= 1.0 and np.isfinite(final["eval/loss"])
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert sorted(metrics) == [1, 2, 3] and all(np.isfinite(m["loss"]) and m["step_time_s"] > 0
                                                for m in metrics.values())

    start, saved = saved_alignment_state(small_config(tmp_path, 3), workdir)
    assert int(saved.step) == 3
    # The whole omni tree came from IT3 and stayed there: LLM base, vision tower, connector.
    assert {"llm", "vision", "connector"} <= set(saved.params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, saved.params), base)
    # The adapters sit on the LLM only and were trained.
    assert set(saved.lora_params) == {"llm"}
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(saved.lora_params)[1::2],
                                                      jax.tree.leaves(start.lora_params)[1::2]))

    # Resume for 2 more steps from the saved LoRA state.
    align.align(small_config(tmp_path, 5), workdir)
    assert sorted(read_metrics(os.path.join(workdir, "metrics.jsonl"))) == [1, 2, 3, 4, 5]


def test_omni_checkpoint_must_hold_the_whole_tree(tmp_path):
    write_llm_stage(small_config(tmp_path, 1), tmp_path / "it3")
    with pytest.raises(ValueError, match="config.model.kind='llm'"):
        align.align(small_config(tmp_path, 1), str(tmp_path / "align"))


@pytest.mark.slow
def test_text_only_alignment_trains_lora_from_previous_stage_and_resumes(tmp_path):
    base_params = write_llm_stage(small_config(tmp_path, 1, kind="llm"), tmp_path / "it3")
    workdir = str(tmp_path / "align")
    final = align.align(small_config(tmp_path, 4, kind="llm"), workdir)
    assert 0.0 <= final["eval/reward_accuracy"] <= 1.0 and np.isfinite(final["eval/loss"])
    first = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert sorted(first) == [1, 2, 3, 4]
    assert first[4]["reward_margin"] > first[1]["reward_margin"]  # preferences are being learned

    # Resume for 2 more steps: continues from the saved LoRA state, base untouched.
    align.align(small_config(tmp_path, 6, kind="llm"), workdir)
    assert sorted(read_metrics(os.path.join(workdir, "metrics.jsonl"))) == [1, 2, 3, 4, 5, 6]
    state_dir = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=3)
    assert state_dir.latest_step() == 6
    state_dir.close()
    assert base_params["embedding"].shape == (1024, 64)


def test_init_from_resolves_against_local_and_bucket_workdirs():
    config = alignment.get_config("tiny")
    config.init_from = "../it3"
    assert align.resolve_init_from(config, "/runs/m2omni/alignment") == "/runs/m2omni/it3"
    assert align.resolve_init_from(config, "gs://bucket/m2omni/alignment") == "gs://bucket/m2omni/it3"
    config.init_from = "gs://other/it3"
    assert align.resolve_init_from(config, "/runs/alignment") == "gs://other/it3"
    config.init_from = ""
    with pytest.raises(ValueError, match="init_from"):
        align.resolve_init_from(config, "/runs/alignment")
