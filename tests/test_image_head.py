"""models/image_head.py: the flow-matching DiT, its loss, its ODE samplers and classifier-free guidance."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from m2omni_jax.models import image_head as ih
from m2omni_jax.parallel import sharding

CFG = ih.ImageHeadConfig.tiny()  # 8×8×3 images, patch 2, width 32, depth 2, cond width 16


def inputs(batch=2, num_cond=3, seed=0, cfg=CFG):
    """Images, times, condition vectors and a mask whose rows see 1, 2, ... (mod num_cond + 1) tokens."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch, *cfg.image_shape)).astype(np.float32)
    cond = rng.normal(size=(batch, num_cond, cfg.cond_width)).astype(np.float32)
    cond_mask = np.arange(num_cond)[None] < np.arange(1, batch + 1)[:, None] % (num_cond + 1)
    return images, rng.uniform(size=batch).astype(np.float32), cond, cond_mask


@functools.partial(jax.jit, static_argnums=(0, 1))
def init(cfg=CFG, batch=2):
    """The boxed variables of an ImageHead at init."""
    return ih.ImageHead(cfg).init(jax.random.key(1), *inputs(batch, cfg=cfg))


@jax.jit
def nonzero(params):
    """Params with every zero-initialised (adaLN-Zero) weight made random, so outputs depend on everything."""
    flat, unravel = ravel_pytree(params)  # one draw: a draw per leaf compiles for many seconds
    return unravel(flat + 0.05 * jax.random.normal(jax.random.key(7), flat.shape))


@pytest.fixture(scope="module")
def variables():
    return init(CFG)


# --------------------------------------------------------------------------- the module

CONFIG_VARIANTS = [{}, dict(scan=False, position_embedding="learned", remat_policy="full", image_size=12,
                            patch_size=4, channels=4)]


@functools.partial(jax.jit, static_argnums=0)
def velocities(cfg, params, images, t, cond, cond_mask):
    """The velocity with the condition, without it, and without a changed one."""
    apply = functools.partial(ih.ImageHead(cfg).apply, params, images, t)
    no_cond = jnp.zeros_like(cond_mask)
    return apply(cond, cond_mask), apply(cond, no_cond), apply(5 * cond + 1, no_cond)


@pytest.mark.parametrize("overrides", CONFIG_VARIANTS)
def test_output_shape_and_unconditional_row(overrides):
    cfg = ih.ImageHeadConfig.tiny(**overrides)
    images, t, cond, cond_mask = inputs(cfg=cfg)
    v, v_uncond, v_uncond_other = velocities(cfg, nonzero(nn.unbox(init(cfg))), images, t, cond, cond_mask)
    assert v.shape == images.shape and v.dtype == jnp.float32
    # An all-False mask ignores the condition's values (only the null token is seen).
    np.testing.assert_allclose(v_uncond, v_uncond_other, atol=1e-6)
    assert np.abs(v - v_uncond).max(axis=(1, 2, 3)).min() > 1e-4  # every row sees its condition


def test_starts_at_zero_velocity(variables):
    """adaLN-Zero: every residual branch and the output projection start at zero."""
    v, _, _ = velocities(CFG, nn.unbox(variables), *inputs())
    np.testing.assert_array_equal(v, 0)


def test_patchify_round_trip_and_order():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = ih.patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    np.testing.assert_array_equal(patches[0, 1].reshape(4, 4, 3), images[0, :4, 4:])  # row-major patches
    np.testing.assert_array_equal(ih.unpatchify(patches, 4, 2), images)


@pytest.mark.parametrize("overrides", CONFIG_VARIANTS)
def test_every_parameter_has_logical_axis_names(overrides):
    variables = init(ih.ImageHeadConfig.tiny(**overrides))
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
    if not overrides:  # scanned: the block stack's leading axis is "layers"
        assert variables["params"]["blocks"]["mlp"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")
    known = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    names = {n for leaf in leaves for n in leaf.names if n is not None}
    assert names <= known, names - known


def test_config_from_config_names_unknown_fields_and_checks_values():
    cfg = ih.ImageHeadConfig.from_config(ml_collections.ConfigDict(dict(image_size=16, patch_size=4, cond_dropout=0.2)))
    assert (cfg.num_patches, cfg.patch_dim, cfg.cond_dropout) == (16, 48, 0.2)
    with pytest.raises(ValueError, match="unknown fields.*'widht'"):
        ih.ImageHeadConfig.from_config({"widht": 64})
    with pytest.raises(ValueError, match="image_size=10"):
        ih.ImageHeadConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="time_sampling"):
        ih.ImageHeadConfig(time_sampling="cosine")


# --------------------------------------------------------------------------- the loss

def test_interpolation_and_target_match_numpy():
    rng = np.random.default_rng(0)
    noise, data = rng.normal(size=(3, 4, 4, 3)), rng.uniform(-1, 1, (3, 4, 4, 3))
    t = np.array([0.0, 0.25, 1.0])
    expected = (1 - t)[:, None, None, None] * noise + t[:, None, None, None] * data
    out = ih.interpolate(jnp.asarray(noise), jnp.asarray(data), jnp.asarray(t))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def oracle(data):
    """The exact velocity toward known data: x_t = (1−t)·x0 + t·x1 gives x1 − x0 = (x1 − x_t)/(1 − t)."""
    return lambda params, x, t, cond, cond_mask: (data - x) / (1 - t)[:, None, None, None]


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_loss_is_zero_for_the_exact_velocity_and_known_for_zero(time_sampling):
    images, _, cond, cond_mask = inputs(64)
    loss = functools.partial(ih.flow_matching_loss, params=None, images=images, cond=cond, cond_mask=cond_mask,
                             rng=jax.random.key(3), time_sampling=time_sampling)
    assert float(loss(oracle(images))) < 1e-6
    # v = 0: E‖x1 − x0‖² per element = mean(x1²) + 1 for standard normal noise.
    zero = float(loss(lambda p, x, t, c, m: jnp.zeros_like(x)))
    assert abs(zero - (float(jnp.mean(images ** 2)) + 1)) < 0.03


def test_noise_draws_score_each_row_at_independent_times_and_keep_the_mask():
    images, _, cond, cond_mask = inputs(2)
    seen = []

    def record_times(p, x, t, c, m):
        seen.append(t)
        return jnp.zeros_like(x)

    rng, valid = jax.random.key(5), jnp.array([True, False])
    kwargs = dict(params=None, cond=cond, cond_mask=cond_mask, rng=rng)
    drawn = ih.flow_matching_loss(record_times, images=images, sample_mask=valid, noise_draws=3, **kwargs)
    assert seen[0].shape == (6,) and len(set(np.asarray(seen[0]).tolist())) == 6  # 3 times per row, all different
    # The same as scoring the rows repeated in place (row 0 three times, then row 1), the mask with them.
    repeated = ih.flow_matching_loss(record_times, images=jnp.repeat(images, 3, 0), sample_mask=jnp.repeat(valid, 3),
                                     **dict(kwargs, cond=jnp.repeat(cond, 3, 0), cond_mask=jnp.repeat(cond_mask, 3, 0)))
    assert float(drawn) == float(repeated)
    # Only row 0 counts: a huge image in the masked row 1 changes nothing.
    masked = ih.flow_matching_loss(record_times, images=jnp.asarray(images).at[1].set(1e3), sample_mask=valid, noise_draws=3, **kwargs)
    assert float(masked) == float(drawn)
    with pytest.raises(ValueError, match="noise_draws=0"):
        ih.ImageHeadConfig(noise_draws=0)


def test_preconditioning_hand_worked_and_least_squares():
    c_skip, c_out = ih.preconditioning(jnp.array([0.0, 0.5, 1.0]), 1)
    np.testing.assert_allclose(c_skip, [-1.0, 0.0, 1.0], atol=1e-6)  # t = 0: v = −x0 + x1 = −x_t + x1
    np.testing.assert_allclose(c_out, [1.0, np.sqrt(2.0), 1.0], rtol=1e-6)
    # Unit-variance data: c_skip·x_t is the least-squares fit of v from x_t, c_out² the residual.
    rng = np.random.default_rng(0)
    data, noise, t = rng.choice([-1.0, 1.0], 200_000), rng.normal(size=200_000), 0.3
    x_t, v = (1 - t) * noise + t * data, data - noise
    fit = np.dot(x_t, v) / np.dot(x_t, x_t)
    (c_skip,), (c_out,) = (np.asarray(c) for c in ih.preconditioning(jnp.array([t]), 1))
    assert abs(fit - c_skip) < 0.01 and abs(np.var(v - fit * x_t) - c_out ** 2) < 0.02


def test_preconditioned_target_and_velocity_invert_each_other():
    images, _, cond, cond_mask = inputs(64)
    residual = lambda p, x, t, c, m: (oracle(images)(p, x, t, c, m)  # noqa: E731
                                      - ih.preconditioning(t, 4)[0] * x) / ih.preconditioning(t, 4)[1]
    loss = ih.flow_matching_loss(residual, None, images, cond, cond_mask, jax.random.key(3), target="preconditioned")
    assert float(loss) < 1e-8
    x, t = jnp.asarray(images), jnp.linspace(0.1, 0.9, 64)
    np.testing.assert_allclose(ih.output_velocity(residual(None, x, t, None, None), x, t, "preconditioned"),
                               oracle(images)(None, x, t, None, None), rtol=1e-4, atol=1e-4)
    # data prediction: the clean image itself gives the exact velocity.
    np.testing.assert_allclose(ih.output_velocity(jnp.asarray(images), x, t, "data"),
                               oracle(images)(None, x, t, None, None), rtol=1e-4, atol=1e-4)


def test_data_normalization_round_trip():
    cfg = ih.ImageHeadConfig.tiny(data_shift=0.9, data_scale=0.3)
    np.testing.assert_allclose(cfg.normalize(np.array([1.2, 0.9])), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(cfg.denormalize(cfg.normalize(np.array([-1.0, 0.5]))), [-1.0, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="data_scale=0"):
        ih.ImageHeadConfig.tiny(data_scale=0.0)


def test_sample_mask_averages_over_chosen_rows():
    images, _, cond, cond_mask = inputs(4)
    wrong_row_1 = lambda p, x, t, c, m: oracle(images)(p, x, t, c, m).at[1].add(1.0)  # noqa: E731
    loss = ih.flow_matching_loss(wrong_row_1, None, images, cond, cond_mask, jax.random.key(0),
                                 sample_mask=jnp.array([1, 0, 1, 1]))
    assert float(loss) < 1e-6


def test_time_sampling_distributions():
    uniform = ih.sample_time(jax.random.key(0), 20000, "uniform")
    logit_normal = ih.sample_time(jax.random.key(0), 20000, "logit_normal")
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.var()) - 1 / 12) < 0.005
    np.testing.assert_allclose(np.std(np.log(logit_normal / (1 - logit_normal))), 1.0, atol=0.02)
    shifted = ih.sample_time(jax.random.key(0), 20000, "logit_normal", mean=-0.5, std=0.5)
    logits = np.log(shifted / (1 - shifted))
    np.testing.assert_allclose([logits.mean(), logits.std()], [-0.5, 0.5], atol=0.02)
    middle = lambda t: float(jnp.mean((t > 0.1) & (t < 0.9)))  # noqa: E731
    assert middle(logit_normal) > middle(uniform)


def test_condition_dropout_drops_whole_rows():
    mask = jnp.ones((4000, 3), bool).at[:, 2].set(False)
    assert bool(jnp.all(ih.drop_condition(jax.random.key(0), mask, 0.0) == mask))
    assert not bool(jnp.any(ih.drop_condition(jax.random.key(0), mask, 1.0)))
    dropped = ih.drop_condition(jax.random.key(0), mask, 0.3)
    kept_rows = dropped[:, 0]
    assert bool(jnp.all(dropped == mask & kept_rows[:, None]))  # whole rows, nothing added
    assert abs(1 - float(kept_rows.mean()) - 0.3) < 0.03
    # Wired into the loss: a model that errs by 1 only where a condition is visible.
    images, _, cond, cond_mask = inputs(64)
    cond_mask = jnp.ones_like(cond_mask)
    errs_if_cond = lambda p, x, t, c, m: oracle(images)(p, x, t, c, m) + m.any(-1)[:, None, None, None]  # noqa: E731
    loss = lambda p: float(ih.flow_matching_loss(errs_if_cond, None, images, cond, cond_mask,  # noqa: E731
                                                 jax.random.key(1), cond_dropout=p))
    assert loss(1.0) < 1e-6 and abs(loss(0.0) - 1) < 1e-5 and 0.1 < loss(0.5) < 0.9


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(cfg, params, images, cond, cond_mask, rng):
    loss = lambda p: ih.flow_matching_loss(ih.ImageHead(cfg).apply, p, images, cond, cond_mask, rng,  # noqa: E731
                                           cond_dropout=0.5)
    return jax.value_and_grad(loss)(params)


@pytest.fixture(scope="module")
def single_device(variables):
    params = nonzero(nn.unbox(variables))
    images, _, cond, cond_mask = inputs(8)
    args = (images, cond, cond_mask, jax.random.key(4))
    return params, args, loss_and_grads(CFG, params, *args)


@pytest.mark.parametrize("mesh_config", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_loss_and_grads_equal_single_device(variables, single_device, mesh_config):
    params, args, (loss1, grads1) = single_device
    mesh = sharding.make_mesh(mesh_config)
    with sharding.activate(mesh):
        sharded = jax.device_put(params, sharding.logical_to_mesh_sharding(variables, mesh))
        batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in args[:3]]
        loss, grads = loss_and_grads(CFG, sharded, *batch, args[3])
    assert len(batch[0].sharding.device_set) == 8
    kernel = sharded["params"]["blocks"]["mlp"]["fc1"]["kernel"]  # (layers, embed, mlp)
    fsdp, tensor = ("fsdp" if mesh.shape["fsdp"] > 1 else None), ("tensor" if mesh.shape["tensor"] > 1 else None)
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, fsdp, tensor)), kernel.ndim)
    np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, grads1)


# --------------------------------------------------------------------------- sampling

def test_euler_one_step_is_exact_for_a_constant_field():
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    velocity = jnp.linspace(-1, 1, 48).reshape(4, 4, 3)
    out = ih.integrate(lambda x, t: jnp.broadcast_to(velocity, x.shape), x0, 1, "euler")
    np.testing.assert_allclose(out, x0 + velocity, rtol=1e-6)


def test_heun_matches_the_closed_form_of_a_linear_field():
    """dx/dt = a·x + b·t: Heun's global error shrinks as dt², Euler's as dt."""
    a, b = -1.5, 2.0
    x0 = jnp.array([1.0, -0.5, 2.0])
    field = lambda x, t: a * x + b * t  # noqa: E731
    # x(1) = x0·e^a + b·(e^a − 1 − a)/a²
    exact = x0 * np.exp(a) + b * (np.exp(a) - 1 - a) / a ** 2
    error = {(m, n): float(jnp.max(jnp.abs(ih.integrate(field, x0, n, m) - exact)))
             for m in ih.SAMPLERS for n in (8, 16)}
    assert error["heun", 16] < 2e-3
    assert 3.5 < error["heun", 8] / error["heun", 16] < 4.5
    assert 1.7 < error["euler", 8] / error["euler", 16] < 2.3
    assert error["heun", 16] < error["euler", 16] / 10


def mean_cond_field(params, x, t, cond, cond_mask):
    """A constant velocity: the mean of the visible condition values (0 when none is visible)."""
    m = cond_mask[..., None]
    v = jnp.sum(cond * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)) * cond.shape[-1], 1)
    return jnp.broadcast_to(v[:, None, None, None], x.shape)


@pytest.mark.parametrize("method", ih.SAMPLERS)
def test_guidance_scales_on_an_analytic_field(method):
    _, _, cond, cond_mask = inputs(3)
    cond = cond + 1
    shape = (4, 4, 3)
    run = functools.partial(ih.sample, mean_cond_field, None, cond, cond_mask, jax.random.key(5),
                            image_shape=shape, num_steps=3, method=method)
    x0 = jax.random.normal(jax.random.key(5), (3, *shape))
    v_cond = mean_cond_field(None, x0, None, cond, cond_mask)
    for scale in (0.0, 1.0, 2.5):  # unconditional v = 0, so v = s·v_cond
        np.testing.assert_allclose(run(guidance_scale=scale), x0 + scale * v_cond, rtol=1e-5, atol=1e-6)


def test_guidance_with_the_model(variables):
    """Scale 1 is conditional sampling, scale 0 unconditional; one Euler step is linear in v, so
    scale s gives x_u + s·(x_c − x_u)."""
    _, _, cond, cond_mask = inputs(3)
    params = nonzero(nn.unbox(variables))

    @jax.jit
    def one_step(cond, cond_mask):
        run = functools.partial(ih.sample, ih.ImageHead(CFG).apply, params, cond, rng=jax.random.key(6),
                                image_shape=CFG.image_shape, num_steps=1)
        return [run(cond_mask=m, guidance_scale=s)
                for m, s in ((cond_mask, 1.0), (jnp.zeros_like(cond_mask), 1.0), (cond_mask, 0.0), (cond_mask, 3.0))]
    x_c, x_u, x_scale0, x_scale3 = one_step(cond, cond_mask)
    assert np.abs(x_c - x_u).max(axis=(1, 2, 3)).min() > 1e-4  # every row sees its condition
    np.testing.assert_allclose(x_scale0, x_u, atol=1e-6)
    np.testing.assert_allclose(x_scale3, x_u + 3.0 * (x_c - x_u), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_overfits_two_solid_images():
    """A few hundred Adam steps on a red and a blue 8×8 image, each named by a 1-token condition;
    sampling from fresh noise then draws the named colour."""
    cfg = ih.ImageHeadConfig.tiny(cond_width=4, cond_dropout=0.0)
    colours = jnp.array([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    images = jnp.tile(jnp.broadcast_to(colours[:, None, None], (2, *cfg.image_shape)), (8, 1, 1, 1))
    cond = jnp.tile(jnp.eye(4)[:2, None], (8, 1, 1))  # (16, 1, 4)
    cond_mask = jnp.ones((16, 1), bool)
    model = ih.ImageHead(cfg)
    params = nn.unbox(model.init(jax.random.key(0), images, jnp.zeros(16), cond, cond_mask))
    tx = optax.adam(3e-3)

    @jax.jit
    def train(params, opt_state, rng):
        def step(carry, rng):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(
                lambda p: ih.flow_matching_loss(model.apply, p, images, cond, cond_mask, rng))(params)
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(rng, 300))
        return params, opt_state, losses

    params, _, losses = train(params, tx.init(params), jax.random.key(1))
    out = ih.sample(model.apply, params, cond[:2], cond_mask[:2], jax.random.key(2), image_shape=cfg.image_shape,
                    num_steps=10, method="heun")
    err = jnp.abs(jnp.clip(out, -1, 1) - images[:2])
    assert float(losses[-20:].mean()) < 0.3 * float(losses[:5].mean())
    assert float(err.mean()) < 0.1
