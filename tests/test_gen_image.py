"""Image output: drawing records assembled and packed, the omni model's image head (sharded =
one device, its loss through the train step with its modality weight, the LLM frozen by flag),
the drawing evaluation, and a run with the head resumed bitwise."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from m2omni_jax.data import chat, media
from m2omni_jax.data import omni_pipeline as op
from m2omni_jax.data import records as records_lib
from m2omni_jax.data.tokenizer import get_tokenizer
from m2omni_jax.inference import generator
from m2omni_jax.modalities import MODALITY_ID, NUM_MODALITIES
from m2omni_jax.models.image_head import ImageOutputConfig
from m2omni_jax.models.llm import LLMConfig
from m2omni_jax.models.omni import OmniConfig, OmniModel, ConnectorConfig, gather_condition
from m2omni_jax.models.vision import VisionConfig
from m2omni_jax.parallel import sharding
from m2omni_jax.training import optimizers, train_step
from m2omni_jax.training.metrics_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN, END, QUERY = "<gen_image>", "</gen_image>", "<gen_imagePatch>"
RED = np.zeros((64, 48, 3), np.uint8) + np.array([220, 20, 20], np.uint8)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    sys.path.insert(0, REPO)
    from configs import base
    root = tmp_path_factory.mktemp("gen_image_tok")
    config = base.get_config()
    config.data.update(dict(dir=str(root / "data")))
    config.data.sources.text.update(dict(num_docs=200, tokenizer_docs=200))
    config.tokenizer.update(dict(cache_dir=str(root / "tok"), vocab_size=400))
    return get_tokenizer(config)


def drawing(caption="a red circle"):
    return {"modality": "image_gen", "gen_images": [RED],
            "messages": [{"role": "user", "content": f"Draw {caption}."},
                         {"role": "assistant", "content": f"{GEN}{caption}{END}"}]}


def assemble(tok, record, route):
    opts = chat.DrawOptions(route=route, num_queries=3, image_size=8, images_per_row=2)
    return chat.assemble_record(tok, record, media.VisionOptions(), None, opts)


def test_query_route_record_hand_worked(tok):
    got = assemble(tok, drawing(), "query")
    s = tok.special_id
    header = lambda role: [s("<|start_header_id|>")] + tok.encode(role) + [s("<|end_header_id|>")] + tok.encode("\n\n")  # noqa: E731
    prompt = [tok.bos_id] + header("user") + tok.encode("Draw a red circle.") + [s("<|eot_id|>")] + header("assistant")
    reply = [s(GEN), s(QUERY), s(QUERY), s(QUERY), s(END), s("<|eot_id|>")]
    np.testing.assert_array_equal(got["ids"], prompt + reply)
    # The whole assistant turn is trained as text (the model learns to write the queries) ...
    np.testing.assert_array_equal(got["mask"], [0] * len(prompt) + [1] * len(reply))
    # ... and the three queries, not the markers, condition drawing 1.
    np.testing.assert_array_equal(got["cond"], [0] * len(prompt) + [0, 1, 1, 1, 0, 0])
    assert got["gen_image"].shape == (1, 8, 8, 3) and got["gen_image_valid"].tolist() == [1]
    np.testing.assert_allclose(got["gen_image"][0], np.broadcast_to([220 / 127.5 - 1, 20 / 127.5 - 1, 20 / 127.5 - 1],
                                                                   (8, 8, 3)), atol=1e-6)
    sample = chat.sample_from_chat(got, MODALITY_ID["image_gen"], None, draw_opts=chat.DrawOptions(image_size=8))
    # Targets: the token after each input; the loss mask and the condition marks stay on the inputs' axis.
    np.testing.assert_array_equal(sample["gen_image_cond"], got["cond"])
    np.testing.assert_array_equal(sample["loss_mask"][len(prompt) - 1:], [1, 1, 1, 1, 1, 1, 0])


def test_caption_route_keeps_the_description_and_conditions_on_it(tok):
    got = assemble(tok, drawing("a red circle at the top left"), "caption")
    s = tok.special_id
    words = tok.encode("a red circle at the top left")
    reply = [s(GEN)] + words + [s(END), s("<|eot_id|>")]
    np.testing.assert_array_equal(got["ids"][-len(reply):], reply)
    np.testing.assert_array_equal(got["cond"][-len(reply):], [0] + [1] * len(words) + [0, 0])
    assert got["mask"][-len(reply):].tolist() == [1] * len(reply) and got["cond"][:-len(reply)].sum() == 0


def test_drawing_records_that_do_not_add_up_are_errors(tok):
    with pytest.raises(ValueError, match=r"1 <gen_image> span\(s\) but 2 gen_images"):
        assemble(tok, dict(drawing(), gen_images=[RED, RED]), "query")
    three = dict(drawing(), gen_images=[RED] * 3, messages=[
        {"role": "user", "content": "Draw."}, {"role": "assistant", "content": f"{GEN}a{END}{GEN}b{END}{GEN}c{END}"}])
    with pytest.raises(ValueError, match=r"3 drawings exceed model.image_head.images_per_row=2"):
        assemble(tok, three, "caption")
    g, e = 7, 8
    with pytest.raises(ValueError, match="never closed"):
        chat.condition_slots([1, g, 5], g, e)
    with pytest.raises(ValueError, match="closes an empty span"):
        chat.condition_slots([g, e], g, e)
    np.testing.assert_array_equal(chat.condition_slots([1, g, 5, 5, e, g, 4, e], g, e), [0, 0, 1, 1, 0, 0, 2, 0])


def test_an_image_caption_record_read_in_reverse_is_a_drawing():
    record = {"modality": "image", "images": [RED], "answer": "a cat",
              "messages": [{"role": "user", "content": "<image>\nDescribe the image."},
                           {"role": "assistant", "content": "a cat"}]}
    got = records_lib.DrawingRecords("Please draw: {}")(record)
    assert got["modality"] == "image_gen" and got["gen_images"][0] is RED and "images" not in got
    assert got["messages"] == [{"role": "user", "content": "Please draw: a cat"},
                               {"role": "assistant", "content": f"{GEN}a cat{END}"}]
    assert records_lib.is_bad(records_lib.DrawingRecords()(dict(record, images=[])))
    decoded = records_lib.decode_record(records_lib.encode_record(got))
    np.testing.assert_array_equal(decoded["gen_images"][0], RED)


def test_packed_rows_number_their_drawings_in_order():
    # Row: sample 1 draws twice, sample 2 once, then padding.
    sample_ids = np.array([1, 1, 1, 1, 1, 2, 2, 2, 0, 0])
    own_spans = np.array([0, 1, 1, 0, 2, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(op.drawing_slots(sample_ids, own_spans), [0, 1, 1, 0, 2, 0, 3, 3, 0, 0])


def test_gather_condition_places_each_slots_tokens_in_order():
    hidden = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
    cond = jnp.array([[0, 1, 1, 2, 1, 0], [2, 2, 2, 0, 0, 0]])
    values, mask = gather_condition(hidden, cond, slots=2, tokens=2)
    np.testing.assert_array_equal(values[..., 0], [[[1, 2], [3, 0]], [[0, 0], [6, 7]]])  # row 2: slot 2 keeps two of three
    np.testing.assert_array_equal(mask, [[[1, 1], [1, 0]], [[0, 0], [1, 1]]])


# ----------------------------------------------------------------------------- the model

LLM = LLMConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64,
                mrope_sections=(2, 3, 3))
HEAD = ImageOutputConfig(enabled=True, route="query", num_queries=3, images_per_row=2, image_size=8, patch_size=2,
                         width=32, depth=2, num_heads=2, cond_width=16, cond_dropout=0.0)
CONFIG = OmniConfig(llm=LLM, vision=VisionConfig.tiny(width=16, depth=1, num_heads=2, out_width=16),
                    connector=ConnectorConfig(), placeholder_ids=(6, 9), image_head=HEAD)
BATCH, LENGTH, PATCHES, Q = 8, 16, 4, 5  # Q: the <gen_imagePatch> id


def make_batch(seed=0):
    """Each row: text, then queries 2..4 for slot 1 and 9..11 for slot 2 (slot 2 empty in odd rows)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 64, (BATCH, LENGTH + 1)).astype(np.int32)
    cond = np.zeros((BATCH, LENGTH), np.int32)
    cond[:, 2:5], tokens[:, 2:5] = 1, Q
    cond[::2, 9:12], tokens[::2, 9:12] = 2, Q
    valid = np.ones((BATCH, 2), np.int32)
    valid[1::2, 1] = 0
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((BATCH, LENGTH), np.float32),
            "segment_ids": np.ones((BATCH, LENGTH), np.int32),
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, 3, LENGTH)).copy(),
            "modality": np.full((BATCH, LENGTH), MODALITY_ID["image_gen"], np.int32),
            "vision_patches": np.zeros((BATCH, PATCHES, 1176), np.float32),
            "vision_segment_ids": np.zeros((BATCH, PATCHES), np.int32),
            "vision_hw": np.zeros((BATCH, 2, PATCHES), np.int32),
            "gen_image": (rng.uniform(-1, 1, (BATCH, 2, 8, 8, 3)) * valid[..., None, None, None]).astype(np.float32),
            "gen_image_valid": valid, "gen_image_cond": cond}


def shapes(batch):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


@pytest.fixture(scope="module")
def model_and_params():
    model = OmniModel(CONFIG)
    params = nn.unbox(model.init(jax.random.key(0), **train_step.model_inputs(make_batch()))["params"])
    # Away from the zero init of the adaLN gates and outputs, so every part of the head matters.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params


def flow_loss(model, params, batch, rng=None):
    rngs = {} if rng is None else {"image_head": rng}
    logits, sown = model.apply({"params": params}, **train_step.model_inputs(batch), mutable=["intermediates"],
                               rngs=rngs)
    return logits, sown["intermediates"]["image_flow_loss"][0], sown["intermediates"]["image_count"][0]


def test_the_head_lives_under_its_own_paths_and_counts_valid_slots(model_and_params):
    model, params = model_and_params
    assert {"image_head", "image_projector", "image_queries"} <= set(params)
    assert params["image_queries"].shape == (3, 32)
    _, loss, count = flow_loss(model, params, make_batch())
    assert float(count) == BATCH * 2 - BATCH // 2 and np.isfinite(float(loss)) and float(loss) > 0


def test_the_condition_reaches_the_drawing(model_and_params):
    model, params = model_and_params
    batch = make_batch()
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][:, 0] = 11  # before the queries: it changes their hidden states
    assert float(flow_loss(model, params, batch)[1]) != float(flow_loss(model, params, changed)[1])
    later = dict(batch, tokens=batch["tokens"].copy())
    later["tokens"][1::2, 12:] = 11  # after the last query of a row whose slot 2 is empty: no effect
    np.testing.assert_array_equal(flow_loss(model, params, batch)[1], flow_loss(model, params, later)[1])


def test_sharded_forward_and_flow_loss_equal_single_device(model_and_params):
    model, params = model_and_params
    batch = make_batch(1)
    rng = jax.random.key(3)
    single_logits, single_loss, _ = jax.jit(lambda p, b: flow_loss(model, p, b, rng))(params, batch)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = train_step.abstract_boxed_params(model, shapes(batch))
    sharded_params = jax.device_put(params, sharding.logical_to_mesh_sharding(boxed, mesh))
    sharded_batch = jax.device_put(batch, train_step.batch_shardings(mesh, tuple(batch)))
    with sharding.activate(mesh):
        logits, loss, _ = jax.jit(lambda p, b: flow_loss(model, p, b, rng))(sharded_params, sharded_batch)
    assert sharded_batch["gen_image"].sharding == sharding.batch_sharding(mesh, 5)
    assert sharded_params["image_head"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single_logits), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(float(loss), float(single_loss), rtol=2e-5)


def test_flow_loss_enters_the_train_loss_with_the_image_out_weight(model_and_params):
    model, params = model_and_params
    batch = make_batch()
    out = MODALITY_ID["image_out"]
    rng = jax.random.key(5)

    def loss_with(weight):
        weights = jnp.ones(NUM_MODALITIES).at[out].set(weight)
        return train_step.loss_fn(params, batch, weights, model=model, z_loss_weight=0.0, rng=rng)
    (l0, m0), (l1, m1), (l2, _) = loss_with(0.0), loss_with(1.0), loss_with(2.0)
    _, flow, count = flow_loss(model, params, batch, rng)
    np.testing.assert_allclose(float(l1 - l0), float(flow), rtol=1e-5)
    np.testing.assert_allclose(float(l2 - l0), 2 * float(flow), rtol=1e-5)
    assert float(m1["token_count"][out]) == float(count)
    np.testing.assert_allclose(float(m1["ce_sum"][out] / m1["token_count"][out]), float(flow), rtol=1e-5)
    grads = jax.grad(lambda p, w: train_step.loss_fn(p, batch, jnp.ones(NUM_MODALITIES).at[out].set(w), model=model,
                                                     z_loss_weight=0.0, rng=rng)[0])
    head_norm = lambda g: float(optimizers.optax.global_norm(g["image_head"]))  # noqa: E731
    assert head_norm(grads(params, 0.0)) == 0.0 and head_norm(grads(params, 1.0)) > 0


def test_a_train_step_with_the_llm_frozen_trains_the_head_and_the_queries(model_and_params):
    model, _ = model_and_params
    batch = make_batch()
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    abstract = nn.unbox(train_step.abstract_boxed_params(model, shapes(batch)))
    opt = ml_collections.ConfigDict(dict(peak_lr=1e-2, warmup_steps=0, frozen=(r"^llm/",)))
    tx = optimizers.make_optimizer(opt, 10, abstract)
    state, _, state_shardings = train_step.create_train_state(model, tx, mesh, sharding.LOGICAL_AXIS_RULES,
                                                              shapes(batch), seed=0)
    frozen = optimizers.frozen_mask(opt, state.params)
    step = train_step.jit_train_step(model, mesh, sharding.LOGICAL_AXIS_RULES, state_shardings,
                                     batch_keys=tuple(batch), frozen=frozen)
    before = jax.device_get(state.params)
    # Three steps: the head's zero-initialised outputs (adaLN-Zero: final projection, then the
    # cross-attention output) pass no gradient back to the condition for the first two.
    for _ in range(3):
        state, metrics = step(state, batch, jnp.ones(NUM_MODALITIES))
    after = jax.device_get(state.params)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before["llm"], after["llm"])
    assert all(jax.tree.leaves(same))
    for name in ("image_head", "image_projector", "image_queries"):
        assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                                    before[name], after[name]))), name
    assert float(metrics["token_count"][MODALITY_ID["image_out"]]) == 12


def test_the_drawer_conditions_on_the_first_span(model_and_params):
    model, params = model_and_params
    open_, close = 7, 8
    np.testing.assert_array_equal(generator.first_span([1, open_, Q, Q, close, open_, Q], open_, close),
                                  [0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(generator.first_span([1, open_, Q], open_, close), [0, 0, 1])  # cut short
    np.testing.assert_array_equal(generator.first_span([1, 2], open_, close), [0, 0])
    batch = make_batch()
    hidden = model.apply({"params": params}, **train_step.model_inputs(
        {k: v for k, v in batch.items() if k not in ("gen_image", "gen_image_valid")}), return_hidden=True)[1]
    images = model.apply({"params": params}, hidden, jnp.asarray(batch["gen_image_cond"]), jax.random.key(0),
                         method=OmniModel.draw)
    assert images.shape == (BATCH * 2, 8, 8, 3) and float(jnp.abs(images).max()) <= 1.0
    assert generator.to_uint8(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_image_head_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config.model.image_head.route='pixels'; use one of"):
        ImageOutputConfig(route="pixels")
    with pytest.raises(ValueError, match=r"config.model.image_head.images_per_row=0 must be positive"):
        ImageOutputConfig(images_per_row=0)
    with pytest.raises(ValueError, match=r"config.model.image_head.prediction='noise'; use one of"):
        ImageOutputConfig(prediction="noise")


# ----------------------------------------------------------------------------- a run


GEN_CONFIG = f"{REPO}/configs/experiments/shapes_world_gen_image.py"
SMALL = [
    "--config.model.llm.width=64", "--config.model.llm.depth=2", "--config.model.llm.num_heads=4",
    "--config.model.llm.num_kv_heads=2", "--config.model.llm.head_dim=16", "--config.model.llm.mrope_sections=(2,3,3)",
    "--config.model.llm.mlp_dim=128", "--config.model.llm.vocab_size=512", "--config.tokenizer.vocab_size=512",
    "--config.model.image_head.width=32", "--config.model.image_head.depth=2", "--config.model.image_head.num_heads=2",
    "--config.model.image_head.image_size=16", "--config.model.image_head.cond_width=32",
    "--config.data.sources.text.num_docs=300", "--config.data.sources.text.tokenizer_docs=300",
    "--config.data.sources.shapes_world.num_train=200", "--config.data.sources.shapes_world.num_eval=40",
    "--config.data.sources.shapes_world.tokenizer_chats=100",
    "--config.train.batch_size=8", "--config.train.log_every=1", "--config.opt.decay=constant",
    "--config.opt.warmup_steps=2", "--config.checkpoint.every=3",
]


def train(workdir, data_dir, steps, route="query"):
    cmd = [sys.executable, "-m", "m2omni_jax.main", f"--config={GEN_CONFIG}:{route}", f"--workdir={workdir}",
           f"--config.data.dir={data_dir}", f"--config.tokenizer.cache_dir={data_dir}/tokenizer", *SMALL,
           f"--config.train.steps={steps}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {step: (r["loss"], r["loss/image_out"]) for step, r in read_metrics(os.path.join(workdir, "metrics.jsonl")).items()}


@pytest.mark.slow
def test_a_run_with_the_image_head_resumes_bitwise(tmp_path):
    data_dir = tmp_path / "data"
    train(tmp_path / "resumed", data_dir, 3)
    resumed = train(tmp_path / "resumed", data_dir, 6)
    straight = train(tmp_path / "straight", data_dir, 6)
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    assert [resumed[s] for s in straight] == [straight[s] for s in straight]  # LM and flow losses, bitwise


def test_it3_draws_only_with_the_image_head():
    sys.path.insert(0, REPO)
    from configs.stages import it3
    from m2omni_jax import build
    plain, drawing_stage = it3.get_config("tiny"), it3.get_config("tiny+draw")
    assert not plain.model.image_head.enabled and "gen_image" not in plain.data.sources.shapes_world.tasks
    assert drawing_stage.model.image_head.enabled and drawing_stage.data.modality_weights["image_gen"] > 0
    assert {"image_gen", "image_out"} <= set(drawing_stage.balance.modalities)
    build.validate_config(drawing_stage, 1, 1)
    drawing_stage.model.image_head.enabled = False
    with pytest.raises(Exception, match=r"'image_gen' weight 0.1, but config.model.image_head.enabled=False"):
        build.validate_config(drawing_stage, 1, 1)
