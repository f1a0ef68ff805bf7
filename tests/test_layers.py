"""layers.token_dot_general: the flattened-token matmul equals lax.dot_general (values and
gradients) for the contractions the models use, and hands every other one to lax.dot_general."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2omni_jax.models import layers

CASES = [  # lhs shape, rhs shape, dimension numbers
    ((2, 3, 5), (5, 4), (((2,), (0,)), ((), ()))),  # Dense on (B, L, in)
    ((2, 3, 4, 5), (5, 7), (((3,), (0,)), ((), ()))),  # more leading axes
    ((2, 3, 4, 5), (4, 5, 6), (((2, 3), (0, 1)), ((), ()))),  # MergeHeads: (B, L, H, D) · (H, D, E)
    ((2, 3, 5), (5, 2, 3), (((2,), (0,)), ((), ()))),  # SplitHeads: (B, L, E) · (E, H, D)
    ((2, 3, 5), (7, 5), (((2,), (1,)), ((), ()))),  # tied LM head: hidden · embeddingᵀ
    ((2, 3, 5), (2, 5, 4), (((2,), (1,)), ((0,), (0,)))),  # batched: not ours, passed through
    ((3, 5), (5, 4), (((1,), (0,)), ((), ()))),  # already 2-D
    ((5, 3, 2), (5, 4), (((0,), (0,)), ((), ()))),  # leading contraction: passed through
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims", CASES)
def test_equals_lax_dot_general_with_gradients(lhs_shape, rhs_shape, dims):
    lhs = jax.random.normal(jax.random.key(0), lhs_shape)
    rhs = jax.random.normal(jax.random.key(1), rhs_shape)
    ours = layers.token_dot_general(lhs, rhs, dims)
    ref = jax.lax.dot_general(lhs, rhs, dims)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    cotangent = jax.random.normal(jax.random.key(2), ref.shape)
    grad = lambda f: jax.grad(lambda a, b: jnp.vdot(f(a, b, dims), cotangent), argnums=(0, 1))(lhs, rhs)  # noqa: E731
    for g_ours, g_ref in zip(grad(layers.token_dot_general), grad(jax.lax.dot_general)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


def test_dense_keeps_nn_dense_parameters_and_values():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
    params = layers.Dense(5, name="proj").init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"bias": (5,), "kernel": (6, 5)}}
    np.testing.assert_allclose(layers.Dense(5).apply(params, x), nn.Dense(5).apply(params, x), rtol=1e-6, atol=1e-6)


def test_kernel_gradient_contracts_one_token_axis():
    """The point of it: the kernel's gradient is a dot over one (flattened) token axis."""
    x, w = jnp.ones((2, 8, 4)), jnp.ones((4, 3))
    grad_hlo = lambda f: jax.jit(jax.grad(lambda w: f(x, w).sum())).lower(w).as_text()  # noqa: E731
    assert "contracting_dims = [0] x [0]" in grad_hlo(layers.token_matmul)
    assert "contracting_dims = [0, 1] x [0, 1]" in grad_hlo(lambda x, w: jnp.einsum("bld,df->blf", x, w))
