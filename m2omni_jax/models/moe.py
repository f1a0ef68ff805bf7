"""Mixture-of-experts feed-forward [MM1, as we read it]: top-2 routing with expert capacity.

GShard-style dispatch: the router picks each token's top-k experts, and
one-hot dispatch/combine tensors (G, S, E, C) move tokens into fixed-size
expert buffers and back with einsums, so everything is static-shaped and
shards by logical axes: expert weights on 'expert', expert-side activations
on 'activation_exp' (the einsum between the two layouts is the all-to-all).

Routing groups are sequences (batch rows): each row has its own capacity
C = ceil(k·S·capacity_factor / E), so routing never depends on how the batch
is sharded. A choice that finds its expert's buffer full is dropped: that
expert contributes nothing for the token and the residual carries it.
Within a row, all first choices queue before any second choice (GShard,
flaxformer), left to right. Padding (segment id 0) is never routed. The
one-hot tensors cost O(B·S²·k·capacity_factor) memory and FLOPs, small next
to the experts for S of a few thousand; longer rows would want sub-groups.

Aux losses, per MoE layer, over non-padding tokens of the whole batch:
  load balance  E · Σ_e f_e·P_e, f_e = fraction of the k·T top-k choices
                (before capacity dropping) that picked e, P_e = mean router
                probability of e. Uniform routing gives exactly 1. (For k=1
                this is Switch's loss; flaxformer's top-k version is k times it.)
  router z-loss mean over tokens of logsumexp(router logits)².
Each layer sows `weight_lb·lb + weight_z·z` as "moe_aux_loss" (plus the raw
terms and the dropped fraction for logging) into 'intermediates'.

Wiring into a train step (`moe_aux_loss` averages over the MoE layers, so
the configured weights hold whatever the depth):

    logits, state = model.apply({"params": params}, **inputs, mutable=["intermediates"])
    loss = loss + moe.moe_aux_loss(state)        # 0.0 for a dense model
    metrics.update(moe.moe_metrics(state))

`state` may be the whole mutable dict or state["intermediates"]; values are
found by name at any depth (a dense model's state is {}, with no key at all),
so the LLM may sit inside a larger model. Without mutable=["intermediates"]
the sows are no-ops (inference, decoding).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from m2omni_jax.models import layers

AUX_LOSS = "moe_aux_loss"
METRIC_NAMES = ("moe_load_balance_loss", "moe_router_z_loss", "moe_dropped_fraction")

# Expert-side activations: experts on 'activation_exp'; the row (group) dim
# is left to the compiler, since 'activation_batch' also claims the expert
# mesh axis and a dim can only be split over a mesh axis once.
_EXPERT_SIDE = ("activation_exp", PartitionSpec.UNCONSTRAINED, None)


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Buffer slots per expert and row; capacity_factor ≤ 0 means no dropping."""
    if capacity_factor <= 0:
        return group_size
    return min(group_size, max(1, math.ceil(top_k * group_size * capacity_factor / num_experts)))


class Routing(NamedTuple):
    dispatch: jax.Array  # (G, S, E, C): 1 where token s sits in slot c of expert e
    combine: jax.Array  # (G, S, E, C): that slot's gate weight
    expert_index: jax.Array  # (G, S, k): chosen experts, best first
    kept: jax.Array  # (G, S, k): the choice got a slot


def top_k_gates(probs, k: int):
    """Top-k probabilities renormalised to sum to 1, and their expert indices."""
    gates, index = jax.lax.top_k(probs, k)
    return gates / jnp.sum(gates, axis=-1, keepdims=True), index


def route(probs, token_mask, top_k: int, capacity: int) -> Routing:
    """probs (G, S, E) fp32, token_mask (G, S) bool -> dispatch/combine tensors."""
    gates, index = top_k_gates(probs, top_k)
    groups, length, num_experts = probs.shape
    choice = jax.nn.one_hot(index, num_experts, dtype=jnp.int32) * token_mask[..., None, None]
    # Queue choice-major (all first choices, then all second choices) so that
    # capacity protects a token's best expert before anyone's runner-up.
    queue = jnp.swapaxes(choice, 1, 2).reshape(groups, top_k * length, num_experts)
    position = jnp.cumsum(queue, axis=1) * queue - 1  # -1 where not chosen
    slot = jnp.swapaxes(position.reshape(groups, top_k, length, num_experts), 1, 2).max(-1)
    slot_one_hot = jax.nn.one_hot(slot, capacity, dtype=probs.dtype)  # slot ∉ [0, C): all zero
    dispatch = jnp.einsum("gske,gskc->gsec", choice.astype(probs.dtype), slot_one_hot)
    combine = jnp.einsum("gsk,gske,gskc->gsec", gates, choice.astype(probs.dtype), slot_one_hot)
    kept = (slot >= 0) & (slot < capacity)
    return Routing(dispatch, combine, index, kept)


def _masked_mean_weights(token_mask):
    mask = token_mask.astype(jnp.float32)
    return mask / jnp.maximum(mask.sum(), 1.0)


def load_balance_loss(probs, expert_index, token_mask):
    """E · Σ_e f_e·P_e over non-padding tokens (see the module docstring)."""
    num_experts, top_k = probs.shape[-1], expert_index.shape[-1]
    weights = _masked_mean_weights(token_mask)
    chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32).sum(-2)
    fraction = jnp.einsum("gse,gs->e", chosen, weights) / top_k
    mean_prob = jnp.einsum("gse,gs->e", probs, weights)
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits, token_mask):
    """Mean over non-padding tokens of logsumexp(logits)²."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(log_z) * _masked_mean_weights(token_mask))


class ExpertDense(nn.Module):
    """Per-expert linear map (E, G, C, in) -> (E, G, C, features); kernel (E, in, features)."""
    features: int
    axes: tuple[str, str, str]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # Fan-in per expert: the leading expert dim is a batch of independent kernels.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1, batch_axis=(0,))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                            (x.shape[0], x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jnp.einsum("egci,eio->egco", x, kernel)


class MoEFeedForward(nn.Module):
    """SwiGLU experts behind a top-k router; (B, S, width) -> (B, S, width)."""
    config: Any  # LLMConfig (llm.py imports this module, so not imported here)
    decode: bool = False

    @nn.compact
    def __call__(self, x, segment_ids):
        cfg = self.config
        token_mask = segment_ids > 0
        logits = layers.Dense(cfg.moe_num_experts, use_bias=False, dtype=jnp.float32,
                          param_dtype=layers.to_dtype(cfg.param_dtype), name="router",
                          kernel_init=layers.kernel_init(("embed", None), scale=0.1))(x.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        # Decoding (prefill too) never drops: a token's output must not depend on what shares its call.
        capacity = expert_capacity(x.shape[1], cfg.moe_num_experts, cfg.moe_top_k,
                                   0.0 if self.decode else cfg.moe_capacity_factor)
        routing = route(probs, token_mask, cfg.moe_top_k, capacity)
        self._sow_losses(logits, probs, routing, token_mask)
        return self._experts(x, routing)

    def _experts(self, x, routing: Routing):
        cfg = self.config
        dtype = layers.to_dtype(cfg.dtype)
        dense = lambda name, feats, axes: ExpertDense(  # noqa: E731
            feats, axes, dtype, layers.to_dtype(cfg.param_dtype), name=name)
        dispatch = nn.with_logical_constraint(routing.dispatch.astype(dtype),
                                              ("activation_batch", "activation_length", None, None))
        tokens = jnp.einsum("gsec,gsd->egcd", dispatch, x.astype(dtype))
        tokens = nn.with_logical_constraint(tokens, _EXPERT_SIDE + ("activation_embed",))
        gate = dense("gate", cfg.mlp_dim, ("expert", "embed", "mlp"))(tokens)
        up = dense("up", cfg.mlp_dim, ("expert", "embed", "mlp"))(tokens)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, _EXPERT_SIDE + ("activation_mlp",))
        out = dense("down", cfg.width, ("expert", "mlp", "embed"))(hidden)
        out = nn.with_logical_constraint(out, _EXPERT_SIDE + ("activation_embed",))
        y = jnp.einsum("egcd,gsec->gsd", out, routing.combine.astype(dtype))
        return nn.with_logical_constraint(y, ("activation_batch", "activation_length", "activation_embed"))

    def _sow_losses(self, logits, probs, routing: Routing, token_mask):
        cfg = self.config
        balance = load_balance_loss(probs, routing.expert_index, token_mask)
        z_loss = router_z_loss(logits, token_mask)
        num_choices = jnp.maximum(token_mask.sum() * cfg.moe_top_k, 1)
        dropped = 1.0 - routing.kept.sum() / num_choices
        self.sow("intermediates", AUX_LOSS,
                 cfg.moe_aux_loss_weight * balance + cfg.moe_router_z_loss_weight * z_loss)
        for name, value in zip(METRIC_NAMES, (balance, z_loss, dropped)):
            self.sow("intermediates", name, value)


def _sown_values(state, name: str) -> list:
    """Every value sown under `name` anywhere in the tree (scanned ones are stacked)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [jnp.ravel(v) for path, v in leaves
            if any(getattr(k, "key", None) == name for k in path)]


def _layer_mean(state, name: str):
    values = _sown_values(state, name)
    if not values:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.concatenate(values))


def moe_aux_loss(state) -> jax.Array:
    """The weighted MoE aux loss, averaged over MoE layers; 0 for a dense model.

    `state`: what model.apply(..., mutable=["intermediates"]) returns second.
    """
    return _layer_mean(state, AUX_LOSS)


def moe_metrics(state) -> dict[str, jax.Array]:
    """Unweighted load-balance loss, router z-loss and dropped fraction, averaged over MoE layers."""
    return {name: _layer_mean(state, name) for name in METRIC_NAMES}
