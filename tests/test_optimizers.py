"""Schedules, MM1 law, parameter groups (frozen, LR multipliers, decay mask), FixNorm, tuning."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from m2omni_jax.training import optimizers as opt_lib
from m2omni_jax.config_fields import replace
from m2omni_jax.run_config import RunConfig


def _opt(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        name="adamw", peak_lr=1e-2, warmup_steps=0, decay="constant",
        final_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, mu_dtype="", grad_clip=0.0,
        weight_decay=0.0, weight_decay_convention="lr_coupled",
        no_decay=(r"(^|/)(scale|bias)$",), param_groups=(), lr_multipliers={}, frozen=(),
        fixnorm=dict(scale_invariant=(), classifier=(), tau=None, per_channel=False,
                     classifier_per_class=False, stacked=())))
    cfg.update(overrides)
    return cfg


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return {
        "vision": {"conv": {"kernel": jax.random.normal(k[0], (4, 6))},
                   "norm": {"scale": jnp.ones((6,))}},
        "llm": {"mlp": {"kernel": jax.random.normal(k[1], (6, 5)), "bias": jnp.zeros((5,))},
                "layers": {"kernel": jax.random.normal(k[2], (3, 5, 4))}},  # nn.scan-stacked
        "lm_head": {"kernel": 0.1 * jax.random.normal(k[3], (4, 10))},
    }


def _run(tx, params, steps=5, seed=1):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(steps):
        grads = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape),
                             params, _keys_like(params, seed + i))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _keys_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.PRNGKey(seed), len(leaves))))


# --------------------------------------------------------------------------- schedule / MM1

def test_cosine_schedule_key_steps():
    s = opt_lib.make_schedule(1e-3, total_steps=1100, warmup_steps=100, decay="cosine",
                              final_fraction=0.1)
    np.testing.assert_allclose(
        [s(0), s(50), s(100), s(600), s(1100), s(5000)],
        [0.0, 5e-4, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4, 1e-4], rtol=1e-5)


def test_linear_and_constant_schedules():
    lin = opt_lib.make_schedule(2.0, total_steps=10, warmup_steps=0, decay="linear",
                                final_fraction=0.5)
    np.testing.assert_allclose([lin(0), lin(5), lin(10), lin(20)], [2.0, 1.5, 1.0, 1.0], rtol=1e-6)
    const = opt_lib.make_schedule(2.0, total_steps=10, warmup_steps=4, decay="constant")
    np.testing.assert_allclose([const(2), const(4), const(9)], [1.0, 2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("decay", opt_lib.DECAYS)
@pytest.mark.parametrize("warmup_steps", [0, 1, 100, 300])
@pytest.mark.parametrize("peak_lr", [1e-3, 3.0])
def test_schedule_matches_formula_at_every_step(decay, warmup_steps, peak_lr):
    """The optax-built schedule equals the closed form (float64) at every step, to fp32 rounding."""
    total, final = 300, 0.1
    steps = np.arange(total + 50, dtype=np.float64)
    t = np.clip((steps - warmup_steps) / max(total - warmup_steps, 1), 0.0, 1.0)
    frac = {"cosine": final + (1 - final) * 0.5 * (1 + np.cos(np.pi * t)),
            "linear": 1 - (1 - final) * t, "constant": np.ones_like(t)}[decay]
    expected = np.where(steps < warmup_steps, peak_lr * steps / max(warmup_steps, 1), peak_lr * frac)
    schedule = opt_lib.make_schedule(peak_lr, total, warmup_steps, decay, final)
    got = jax.vmap(schedule)(jnp.arange(len(steps)))
    # ≤ 1e-7 absolute at a real LR (1e-3); ~2 fp32 ulps of the peak in general.
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=2e-7 * peak_lr)


def test_path_str_joins_dict_keys_attributes_and_indices():
    tree = {"llm": {"layers": [jnp.zeros(1), {"kernel": nn.Partitioned(jnp.zeros(2), ("embed",))}]}}
    state = optax.adam(1e-3).init({"w": jnp.zeros(1)})
    paths = [opt_lib.path_str(p) for tree in (tree, state) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["llm/layers/0", "llm/layers/1/kernel/value", "0/count", "0/mu/w", "0/nu/w"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(peak_lr=0.0), "opt.peak_lr"), (dict(total_steps=0), "config.train.steps"),
    (dict(warmup_steps=11), "opt.warmup_steps"), (dict(decay="step"), "opt.decay"),
    (dict(final_fraction=1.5), "opt.final_fraction")])
def test_schedule_errors_name_the_field(kwargs, field):
    args = dict(peak_lr=1.0, total_steps=10, warmup_steps=1, decay="cosine", final_fraction=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        opt_lib.make_schedule(**args)


def test_mm1_lr_and_wd_known_sizes():
    # exp(-0.4214*ln(1e9) - 0.5535) = exp(-0.4214*20.7233 - 0.5535) = exp(-9.2862)
    eta, wd = opt_lib.mm1_lr_and_wd(1e9)
    assert eta == pytest.approx(9.2687e-5, rel=1e-4) and wd == pytest.approx(9.2687e-6, rel=1e-4)
    assert opt_lib.mm1_lr_and_wd(30e9)[0] == pytest.approx(2.2108e-5, rel=1e-4)
    with pytest.raises(ValueError, match="num_params"):
        opt_lib.mm1_lr_and_wd(0)


@pytest.mark.parametrize("name, num_params, eta", [("m2omni_9b", 8_030_261_248, 3.8527e-5),
                                                   ("m2omni_72b", 70_553_706_496, 1.5419e-5)])
def test_large_configs_take_peak_lr_and_weight_decay_from_the_mm1_law(name, num_params, eta):
    import importlib
    from m2omni_jax.models.llm import LLMConfig
    from m2omni_jax.run_config import RunConfig
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.opt.peak_lr == "mm1"  # resolved at entry, not baked into the file
    assert LLMConfig.from_config(config.model.llm).num_params() == num_params  # Llama-3.1-8B / 3.3-70B
    opt = RunConfig.of(config).opt
    assert opt.lr_law == "mm1"
    assert opt.peak_lr == opt_lib.mm1_lr_and_wd(num_params)[0] == pytest.approx(eta, rel=1e-4)
    assert opt.weight_decay == pytest.approx(0.1 * opt.peak_lr, rel=1e-12)
    assert opt.weight_decay_convention == "schedule_only"  # λ per step, not λ·lr


# --------------------------------------------------------------------------- labels / groups

def test_param_labels_first_match_wins_and_default():
    labels = opt_lib.param_labels(_params(), [(r"^vision/", "vision"), (r"kernel$", "kernels")])
    assert labels["vision"]["conv"]["kernel"] == "vision"
    assert labels["llm"]["mlp"]["kernel"] == "kernels"
    assert labels["llm"]["mlp"]["bias"] == "default"


def test_param_labels_keep_partitioned_boxes():
    boxed = {"a": nn.Partitioned(jnp.ones((2, 3)), names=("embed", "mlp")), "b": jnp.ones(3)}
    labels = opt_lib.param_labels(boxed, [(r"^a$", "x")])
    assert isinstance(labels["a"], nn.Partitioned) and labels["a"].value == "x"
    assert labels["b"] == "default"


def test_frozen_params_unchanged_and_keep_no_state():
    params = _params()
    tx = opt_lib.make_optimizer(_opt(frozen=(r"^llm/",)), 100, params)
    new = _run(tx, params)
    for path in (("llm", "mlp", "kernel"), ("llm", "layers", "kernel")):
        a, b = params, new
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(new["vision"]["conv"]["kernel"], params["vision"]["conv"]["kernel"])
    n_state = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    n_trainable = sum(x.size for k, x in params.items() if k != "llm" for x in jax.tree.leaves(x))
    assert n_state <= 2 * n_trainable + 8  # Adam's two moments + counters, nothing for llm/


def test_lr_multiplier_scales_update():
    params = {"a": jnp.ones((3,)), "b": jnp.ones((3,))}
    cfg = _opt(param_groups=((r"^b$", "slow"),), lr_multipliers={"slow": 0.1})
    tx = opt_lib.make_optimizer(cfg, 100, params)
    grads = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([1.0, -2.0, 3.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["b"], 0.1 * updates["a"], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown groups"):
        opt_lib.make_optimizer(_opt(lr_multipliers={"nope": 2.0}), 100, params)


def test_weight_decay_skips_scale_and_bias_and_conventions():
    params = {"k": jnp.full((2, 2), 2.0), "bias": jnp.ones((2,)), "n": {"scale": jnp.ones((2,))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for convention, expected in (("lr_coupled", -1e-2 * 0.5 * 2.0), ("schedule_only", -0.5 * 2.0)):
        cfg = _opt(weight_decay=0.5, weight_decay_convention=convention)
        tx = opt_lib.make_optimizer(cfg, 100, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        np.testing.assert_allclose(updates["k"], expected, rtol=1e-6)
        np.testing.assert_array_equal(updates["bias"], 0.0)
        np.testing.assert_array_equal(updates["n"]["scale"], 0.0)


def test_minimal_config_uses_defaults():
    cfg = ml_collections.ConfigDict(dict(name="adamw", peak_lr=1e-2, warmup_steps=0,
                                         decay="cosine", weight_decay=0.5, grad_clip=1.0))
    params = {"k": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    tx = opt_lib.make_optimizer(cfg, 10, params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["k"], -1e-2 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    assert float(opt_lib.make_schedule_from_config(cfg, 10)(10)) == pytest.approx(1e-3)


def test_grad_clip_stage_present_only_when_enabled():
    params = {"a": jnp.zeros((4,))}
    assert len(opt_lib.make_optimizer(_opt(grad_clip=1.0), 100, params).init(params)) == 2
    assert len(opt_lib.make_optimizer(_opt(grad_clip=0.0), 100, params).init(params)) == 1
    with pytest.raises(ValueError, match="opt.grad_clip"):
        opt_lib.make_optimizer(_opt(grad_clip=-1.0), 100, params)


# --------------------------------------------------------------------------- FixNorm

def _fixnorm_cfg(**fn):
    base = dict(scale_invariant=(r"^vision/conv/kernel$", r"^llm/layers/kernel$"),
                classifier=(r"^lm_head/kernel$",), tau=2.5, per_channel=False,
                classifier_per_class=False, stacked=(r"^llm/layers/",))
    base.update(fn)
    return _opt(name="fixnorm", weight_decay=0.1, fixnorm=base)


def test_fixnorm_holds_norms_and_leaves_others_as_adam():
    params = _params()
    new = _run(opt_lib.make_optimizer(_fixnorm_cfg(), 100, params), params)
    w0 = params["vision"]["conv"]["kernel"]
    assert float(jnp.linalg.norm(new["vision"]["conv"]["kernel"])) == pytest.approx(
        float(jnp.linalg.norm(w0)), rel=1e-5)
    assert not np.allclose(new["vision"]["conv"]["kernel"], w0)
    # stacked: one norm per layer, each at its own initial value
    per_layer = lambda x: jnp.sqrt(jnp.sum(x * x, axis=(1, 2)))
    np.testing.assert_allclose(per_layer(new["llm"]["layers"]["kernel"]),
                               per_layer(params["llm"]["layers"]["kernel"]), rtol=1e-5)
    assert float(jnp.linalg.norm(new["lm_head"]["kernel"])) == pytest.approx(2.5, rel=1e-5)
    # unlabelled params: FixNorm drops weight decay, so they match AdamW with weight_decay=0
    plain = _run(opt_lib.make_optimizer(_opt(weight_decay=0.0), 100, params), params)
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(new["llm"]["mlp"][key], plain["llm"]["mlp"][key], rtol=1e-6)
    np.testing.assert_allclose(new["vision"]["norm"]["scale"], plain["vision"]["norm"]["scale"],
                               rtol=1e-6)


def test_fixnorm_per_channel_and_per_class():
    params = _params()
    cfg = _fixnorm_cfg(per_channel=True, classifier_per_class=True, tau=0.7)
    new = _run(opt_lib.make_optimizer(cfg, 100, params), params)
    col = lambda x: jnp.sqrt(jnp.sum(x * x, axis=0))
    np.testing.assert_allclose(col(new["vision"]["conv"]["kernel"]),
                               col(params["vision"]["conv"]["kernel"]), rtol=1e-5)
    np.testing.assert_allclose(col(new["lm_head"]["kernel"]), 0.7, rtol=1e-5)
    per_layer_col = lambda x: jnp.sqrt(jnp.sum(x * x, axis=1))
    np.testing.assert_allclose(per_layer_col(new["llm"]["layers"]["kernel"]),
                               per_layer_col(params["llm"]["layers"]["kernel"]), rtol=1e-5)


def test_fixnorm_frozen_classifier_is_not_projected():
    params = _params()
    cfg = _fixnorm_cfg()
    cfg.frozen = (r"^lm_head/",)
    new = _run(opt_lib.make_optimizer(cfg, 100, params), params)
    np.testing.assert_array_equal(new["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_fixnorm_requires_params():
    tx = opt_lib.fixnorm({"w": "classifier"}, tau=1.0)
    state = tx.init({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones((2, 2))}, state)


def test_optimizer_on_partitioned_params():
    boxed = {"w": nn.Partitioned(jnp.ones((2, 3)), names=("embed", "mlp")),
             "head": nn.Partitioned(jnp.ones((3, 4)), names=("embed", "vocab"))}
    cfg = _opt(name="fixnorm", fixnorm=dict(scale_invariant=(r"^w$",), classifier=(r"^head$",),
                                            tau=3.0, per_channel=False,
                                            classifier_per_class=False, stacked=()))
    tx = opt_lib.make_optimizer(cfg, 100, boxed)
    grads = jax.tree.map(lambda x: x * 0.3, boxed)
    updates, _ = tx.update(grads, tx.init(boxed), boxed)
    new = optax.apply_updates(boxed, updates)
    assert float(jnp.linalg.norm(new["head"].value)) == pytest.approx(3.0, rel=1e-5)
    assert float(jnp.linalg.norm(new["w"].value)) == pytest.approx(math.sqrt(6), rel=1e-5)


# --------------------------------------------------------------------------- tuning

def test_tune_fixnorm_two_stage_search():
    calls = []

    def run_fn(eta, tau):  # decoupled bowl with optimum at eta=1e-3, tau=4
        calls.append((eta, tau))
        return (math.log10(eta) + 3) ** 2 + (tau - 4.0) ** 2

    best, table = opt_lib.tune_fixnorm(run_fn, [1e-4, 1e-3, 1e-2], [1.0, 2.0, 4.0, 8.0],
                                       tau_default=2.0)
    assert best == (1e-3, 4.0)
    assert calls[:3] == [(1e-4, 2.0), (1e-3, 2.0), (1e-2, 2.0)]
    assert calls[3:] == [(1e-3, 1.0), (1e-3, 4.0), (1e-3, 8.0)]  # tau_default not re-run
    assert [r["stage"] for r in table] == [1, 1, 1, 2, 2, 2]


def test_tune_fixnorm_nan_ranks_last_and_max_mode():
    best, _ = opt_lib.tune_fixnorm(lambda e, t: float("nan") if e > 1 else e * t,
                                   [0.5, 2.0], [1.0], tau_default=1.0, mode="max")
    assert best == (0.5, 1.0)
    plan = opt_lib.fixnorm_tuning_plan([1e-3], [1.0, 3.0], 3.0)
    assert plan.eta_trials == [(1e-3, 3.0)] and plan.tau_grid == [1.0]


# --------------------------------------------------------------------------- FixNorm preset

def _normal_like(tree, seed, scale=0.05):
    rng = np.random.default_rng(seed)  # numpy: a jax.random call per shape would compile each
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), tree)


def _omni_params(connector="linear", mlp=False, audio_projector="linear", seed=0):
    """configs/tiny.py's omni model with `connector`: (config, random params of its shapes)."""
    from configs import tiny
    from m2omni_jax import build
    from m2omni_jax.models.omni import OmniConfig, OmniModel
    from m2omni_jax.training import train_step
    config = tiny.get_config()
    config.model.llm.update(dict(vocab_size=64, width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                 mlp_dim=64, mrope_sections=(2, 3, 3)))
    config.model.audio.update(dict(width=32, depth=2, mlp_dim=64))
    config.model.connector.update(dict(kind=connector, mlp=mlp, num_tokens=4, depth=1, hidden_width=16))
    config.model.audio.projector = audio_projector
    config = RunConfig.of(config)
    model = OmniModel(OmniConfig.from_config(config.model, (6, 9), audio_placeholder_id=7, end_of_audio_id=8))
    shapes = nn.unbox(train_step.abstract_boxed_params(model, build.example_batch_shapes(config)))
    return config, _normal_like(shapes, seed)


def _paths_labelled(config, params, label):
    labels, _ = opt_lib._fixnorm_labels(config.opt, params)
    flat = jax.tree_util.tree_leaves_with_path(labels)
    return sorted(opt_lib.path_str(p) for p, lab in flat if lab == label)


@pytest.mark.parametrize("connector, mlp, audio_projector, expected", [
    ("linear", False, "linear", ["audio/projector/proj/kernel", "connector/proj/kernel"]),
    ("linear", True, "mlp", ["audio/projector/fc2/kernel", "connector/fc2/kernel"]),
    ("c_abstractor", False, "linear", ["audio/projector/proj/kernel"] + [  # stage 1 changes width: a shortcut conv
        f"connector/stage{s}_block0/{conv}/kernel" for s in (1, 2)
        for conv in ("expand", "reduce") + (("shortcut",) if s == 1 else ()) + ("spatial",)]),
    ("avg_pool", False, "linear", ["audio/projector/proj/kernel"]),  # its proj feeds the LLM unnormalised
])
def test_fixnorm_preset_labels_the_weights_a_norm_follows_and_holds_them(connector, mlp, audio_projector,
                                                                        expected):
    config, params = _omni_params(connector, mlp, audio_projector)
    assert _paths_labelled(config, params, opt_lib.SCALE_INVARIANT) == []  # base.py: inert
    config = opt_lib.fixnorm_preset(config)
    assert config.opt.name == "fixnorm"
    assert _paths_labelled(config, params, opt_lib.SCALE_INVARIANT) == expected
    assert _paths_labelled(config, params, opt_lib.CLASSIFIER) == ["llm/lm_head/kernel"]
    opt = replace(config.opt, peak_lr=1e-2, warmup_steps=0)  # steps large enough for norms to drift
    tx = opt_lib.make_optimizer(opt, 100, params)
    state, update, new = tx.init(params), jax.jit(tx.update), params
    for step in range(3):
        grads = _normal_like(params, seed=step + 1, scale=1.0)
        updates, state = update(grads, state, new)
        new = optax.apply_updates(new, updates)
    flat_old = dict((opt_lib.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params))
    flat_new = dict((opt_lib.path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(new))
    for path in expected:
        assert float(jnp.linalg.norm(flat_new[path])) == pytest.approx(
            float(jnp.linalg.norm(flat_old[path])), rel=1e-5), path
        assert not np.allclose(flat_new[path], flat_old[path]), path  # moved, on its sphere
    free = "vision/merger/fc2/kernel"  # not followed by a norm: its norm drifts
    assert abs(float(jnp.linalg.norm(flat_new[free])) - float(jnp.linalg.norm(flat_old[free]))) > 1e-4


def test_fixnorm_preset_keeps_rules_already_given_and_text_only_models_have_none():
    config, _ = _omni_params()
    config = replace(config, **{"opt.fixnorm.scale_invariant": (r"^mine$",)})
    config = opt_lib.fixnorm_preset(config)
    assert config.opt.fixnorm.scale_invariant == (r"^mine$", r"^connector/proj/kernel$",
                                                  r"^audio/projector/proj/kernel$")
    config = replace(config, **{"model.kind": "llm"})
    assert opt_lib.fixnorm_scale_invariant(config) == ()
