"""The language model: a Llama-3 decoder with M-RoPE.

RMSNorm, SwiGLU, grouped-query attention, no biases [paper: Llama-3.1-8B /
Llama-3.3-70B]. The 1-D rotary embedding is replaced by M-RoPE: the head's
frequency pairs are split among (time, height, width) position ids, so text
(t = h = w) sees ordinary RoPE and image/video tokens see their grid.

Packed sequences: `segment_ids` (0 = padding) stop attention across samples.
Decoding: with `decode=True` keys/values go to a 'cache' collection; a call
with L tokens writes them at the cache index and attends causally to
everything written so far (prefill is one call with the whole prompt).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2omni_jax.config_fields import dataclass_from_config
from m2omni_jax.models import layers, moe, rope

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
# Training/prefill attention is causal: queries go in this many blocks, each skipping the keys
# after it (layers.dot_product_attention, "einsum"): 5/8 of the L×L logits are computed.
CAUSAL_QUERY_BLOCKS = 4


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 500_000.0
    mrope_sections: tuple[int, ...] = (16, 24, 24)
    # "sectioned" (Qwen2-VL, the paper's) | "interleaved" (Qwen3-VL): rope.mrope_axis_of_pair.
    mrope_layout: str = "sectioned"
    # Llama-3.1's long-context RoPE ("llama3": rope.llama3_scaled_frequencies) or "none".
    # The four fields after it are its parameters, defaults Llama-3.1's own.
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "full"  # see layers.REMAT_POLICIES
    attention_implementation: str = layers.DEFAULT_ATTENTION  # see layers.ATTENTION_IMPLEMENTATIONS
    scan_layers: bool = True
    # Training loss only: > 0 applies the LM head and cross-entropy to this many sequence
    # positions at a time (scanned, rematerialised), so the (B, L, vocab) logits never exist
    # whole (training/train_step.py: chunked_cross_entropy_terms); 0: all at once.
    lm_head_chunk: int = 0
    # Mixture of experts [MM1, as we read it]; 0 experts = dense. The last layer
    # of every `moe_every` is MoE (2: layers 1, 3, 5, ...). See models/moe.py.
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25  # ≤ 0: no token dropping
    moe_every: int = 2
    moe_aux_loss_weight: float = 0.01
    moe_router_z_loss_weight: float = 0.001

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.llm.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if sum(self.mrope_sections) * 2 != self.head_dim:
            raise ValueError(f"model.llm.mrope_sections={tuple(self.mrope_sections)} must sum to "
                             f"head_dim/2={self.head_dim // 2}")
        layers.check_attention_implementation(self.attention_implementation, "model.llm.attention_implementation")
        if self.rope_scaling not in rope.ROPE_SCALINGS:
            raise ValueError(f"model.llm.rope_scaling={self.rope_scaling!r}; use one of {rope.ROPE_SCALINGS}")
        if self.mrope_layout not in rope.MROPE_LAYOUTS:
            raise ValueError(f"model.llm.mrope_layout={self.mrope_layout!r}; use one of {rope.MROPE_LAYOUTS}")
        if self.lm_head_chunk < 0:
            raise ValueError(f"model.llm.lm_head_chunk={self.lm_head_chunk} must be ≥ 0 (0: no chunking)")
        if self.moe_num_experts and not 0 < self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"model.llm.moe_top_k={self.moe_top_k} must be in [1, "
                             f"moe_num_experts={self.moe_num_experts}]")
        if self.moe_num_experts and (self.moe_every < 1 or self.depth % self.moe_every):
            raise ValueError(f"model.llm.depth={self.depth} must be a multiple of moe_every={self.moe_every}")

    def rope_inverse_frequencies(self) -> jnp.ndarray:
        """(head_dim/2,) RoPE frequencies, scaled as `rope_scaling` says."""
        inv_freq = rope.inverse_frequencies(self.head_dim, self.rope_theta)
        if self.rope_scaling == "llama3":
            inv_freq = rope.llama3_scaled_frequencies(inv_freq, self.rope_scaling_factor, self.rope_low_freq_factor,
                                                      self.rope_high_freq_factor, self.rope_original_max_len)
        return inv_freq

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_num_experts > 0 and index % self.moe_every == self.moe_every - 1

    @classmethod
    def from_config(cls, cfg) -> "LLMConfig":
        """Builds from a ConfigDict / mapping, naming any field it does not know."""
        if isinstance(cfg, cls):
            return cfg
        sections = tuple(dict(cfg).get("mrope_sections", cls.mrope_sections))
        return dataclass_from_config(cls, cfg, "model.llm", mrope_sections=sections)

    @property
    def num_qkv_biases(self) -> int:
        return self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """All parameters, or with `active` only those one token uses (its top-k experts)."""
        attn = self.width * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads) + self.num_qkv_biases
        mlp = 3 * self.width * self.mlp_dim
        experts = self.moe_top_k if active else self.moe_num_experts
        moe_mlp = experts * mlp + self.width * self.moe_num_experts  # + router
        num_moe = sum(self.is_moe_layer(i) for i in range(self.depth))
        per_layer = attn + 2 * self.width
        layers_total = self.depth * per_layer + (self.depth - num_moe) * mlp + num_moe * moe_mlp
        embed = self.vocab_size * self.width
        head = 0 if self.tie_embeddings else self.vocab_size * self.width
        return layers_total + self.width + head + (embed if include_embedding else 0)


def _dtypes(config: LLMConfig):
    return dict(dtype=layers.to_dtype(config.dtype), param_dtype=layers.to_dtype(config.param_dtype))


def attention_mask(q_segments, k_segments, q_index, k_index):
    """Causal and same-segment: (B, 1, Lq, Lk) boolean, one mask for every head."""
    same_segment = q_segments[:, :, None] == k_segments[:, None, :]
    causal = q_index[:, :, None] >= k_index[:, None, :]
    return (same_segment & causal)[:, None, :, :]


class Attention(nn.Module):
    config: LLMConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, angles, segment_ids):
        cfg = self.config
        proj = lambda name, heads, axis: layers.SplitHeads(  # noqa: E731
            heads, cfg.head_dim, axis, use_bias=cfg.qkv_bias, name=name, **_dtypes(cfg))
        q = proj("query", cfg.num_heads, "heads")(x)
        k = proj("key", cfg.num_kv_heads, "kv_heads")(x)
        v = proj("value", cfg.num_kv_heads, "kv_heads")(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        q, k = rope.apply_rotary(q, angles), rope.apply_rotary(k, angles)

        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), segment_ids.shape)
        if self.decode:
            k, v, k_segments, k_index, q_index = self._update_cache(k, v, segment_ids)
            mask = attention_mask(segment_ids, k_segments, q_index, k_index)
        else:
            mask = attention_mask(segment_ids, segment_ids, positions, positions)
        out = layers.dot_product_attention(q, k, v, mask, implementation=cfg.attention_implementation,
                                           causal_blocks=1 if self.decode else CAUSAL_QUERY_BLOCKS)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        return layers.MergeHeads(cfg.width, name="out", **_dtypes(cfg))(out)

    def _update_cache(self, k, v, segment_ids):
        """Writes this call's keys/values at the cache index; returns the whole cache."""
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_segments = self.variable("cache", "cached_segment_ids", jnp.zeros,
                                        segment_ids.shape, jnp.int32)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        batch, length = segment_ids.shape
        cache_len = cached_key.value.shape[1]
        q_index = jnp.broadcast_to(index.value + jnp.arange(length, dtype=jnp.int32), (batch, length))
        k_index = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (batch, cache_len))
        if not initialised:  # creating the cache: nothing to write yet
            return k, v, segment_ids, q_index, q_index
        start = (0, index.value, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, start)
        cached_segments.value = jax.lax.dynamic_update_slice(
            cached_segments.value, segment_ids.astype(jnp.int32), (0, index.value))
        index.value = index.value + length
        return cached_key.value, cached_value.value, cached_segments.value, k_index, q_index


class SwiGLU(nn.Module):
    config: LLMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda name, feats, axes: layers.Dense(  # noqa: E731
            feats, use_bias=False, name=name, **_dtypes(cfg), kernel_init=layers.kernel_init(axes))
        gate = dense("gate", cfg.mlp_dim, ("embed", "mlp"))(x)
        up = dense("up", cfg.mlp_dim, ("embed", "mlp"))(x)
        hidden = nn.with_logical_constraint(layers.swiglu(gate, up),
                                            ("activation_batch", "activation_length", "activation_mlp"))
        return dense("down", cfg.width, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
    config: LLMConfig
    decode: bool = False
    use_moe: bool = False

    @nn.compact
    def __call__(self, x, angles, segment_ids):
        cfg = self.config
        norm = lambda name: layers.RMSNorm(cfg.norm_eps, name=name, **_dtypes(cfg))  # noqa: E731
        x = x + Attention(cfg, self.decode, name="attention")(norm("attention_norm")(x), angles, segment_ids)
        if self.use_moe:
            x = x + moe.MoEFeedForward(cfg, self.decode, name="mlp")(norm("mlp_norm")(x), segment_ids)
        else:
            x = x + SwiGLU(cfg, name="mlp")(norm("mlp_norm")(x))
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        return x, None


class DecoderBlock(nn.Module):
    """`moe_every` layers, the last one MoE: the scanned unit of an interleaved MoE stack."""
    config: LLMConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, angles, segment_ids):
        cfg = self.config
        for i in range(cfg.moe_every):
            x, _ = DecoderLayer(cfg, self.decode, cfg.is_moe_layer(i), name=f"layer_{i}")(x, angles, segment_ids)
        return x, None


class DecoderStack(nn.Module):
    """`depth` decoder layers: scanned (one compiled body) or unrolled.

    Scanned, a dense or all-MoE stack scans single layers; an interleaved MoE
    stack (moe_every > 1) scans DecoderBlocks of `moe_every` layers.
    """
    config: LLMConfig

    @nn.compact
    def __call__(self, x, angles, segment_ids, decode: bool = False):
        cfg = self.config
        if cfg.scan_layers:
            return self._scanned(x, angles, segment_ids, decode)
        layer_cls = layers.maybe_remat(DecoderLayer, cfg.remat_policy)
        for i in range(cfg.depth):
            x, _ = layer_cls(cfg, decode, cfg.is_moe_layer(i), name=f"layers_{i}")(x, angles, segment_ids)
        return x

    def _scanned(self, x, angles, segment_ids, decode):
        cfg = self.config
        if cfg.moe_num_experts and cfg.moe_every > 1:
            unit, args, length = DecoderBlock, (cfg, decode), cfg.depth // cfg.moe_every
        else:
            unit, args, length = DecoderLayer, (cfg, decode, cfg.moe_num_experts > 0), cfg.depth
        scanned = nn.scan(layers.maybe_remat(unit, cfg.remat_policy),
                          variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=length,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(*args, name="layers")(x, angles, segment_ids)
        return x


class LLM(nn.Module):
    """Token (or embedding) sequence -> next-token logits."""
    config: LLMConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.width), layers.to_dtype(cfg.param_dtype))
        self.decoder = DecoderStack(cfg)
        self.final_norm = layers.RMSNorm(cfg.norm_eps, **_dtypes(cfg))
        if not cfg.tie_embeddings:
            self.lm_head = layers.Dense(cfg.vocab_size, use_bias=False, **_dtypes(cfg),
                                    kernel_init=layers.kernel_init(("embed", "vocab")))

    def embed_tokens(self, tokens):
        x = jnp.take(self.embedding, tokens, axis=0).astype(layers.to_dtype(self.config.dtype))
        return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

    def __call__(self, tokens=None, positions=None, segment_ids=None, *, inputs_embeds=None,
                 decode: bool = False, return_hidden: bool = False):
        """tokens (B,L) or inputs_embeds (B,L,width); positions (3,B,L) M-RoPE ids
        (or (B,L) for text-only 1-D positions); segment_ids (B,L), 0 = padding.
        Returns logits, or (logits, final hidden states) with return_hidden: logits a caller
        leaves unused are never computed under jit (the chunked loss applies `head` itself)."""
        cfg = self.config
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3, batch, length))
        angles = rope.mrope_angles(positions, cfg.head_dim, cfg.mrope_sections, cfg.rope_theta,
                                 cfg.mrope_layout, cfg.rope_inverse_frequencies())
        x = self.decoder(x, angles, segment_ids, decode)
        hidden = self.final_norm(x)
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits

    def head(self, hidden):
        """Final hidden states (B, L, width) -> logits (B, L, vocab): the LM head (the token
        embedding when tied). Applied on its own, chunk by chunk, by the chunked
        cross-entropy (training/train_step.py), so the whole logits never exist at once."""
        cfg = self.config
        if cfg.tie_embeddings:
            embedding = self.embedding.astype(hidden.dtype)  # (vocab, width): contract its width
            logits = layers.token_dot_general(hidden, embedding, (((hidden.ndim - 1,), (1,)), ((), ())))
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def training_flops_per_token(config: LLMConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), as in PaLM App. B.

    6·N for every matmul weight N (attention projections, MLP, LM head; the
    embedding lookup is not a matmul), plus attention scores and the weighted
    sum of values: 2 matmuls of L·d_attn per token forward, ×3 for backward,
    = 12·depth·d_attn·L. Full (masked) L×L attention is what is computed, so
    it is counted in full. MoE layers count the router and the top-k experts a
    token uses, not the dispatch/combine einsums. Rematerialisation is not
    counted (MFU, not HFU).
    """
    norms_and_biases = (2 * config.depth + 1) * config.width + config.depth * config.num_qkv_biases
    matmul_params = config.num_params(include_embedding=False, active=True) - norms_and_biases
    if config.tie_embeddings:
        matmul_params += config.vocab_size * config.width
    attention = 12 * config.depth * config.num_heads * config.head_dim * seq_len
    return 6.0 * matmul_params + attention


def init_cache(model: LLM, batch_size: int, max_len: int, params=None) -> Any:
    """A zeroed KV cache for `max_len` positions."""
    tokens = jnp.zeros((batch_size, max_len), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(variables["cache"]))


def logical_axes(tree: Any) -> Any:
    """Logical PartitionSpecs of a boxed variable tree."""
    return nn.get_partition_spec(tree)


__all__: Sequence[str] = ("LLMConfig", "LLM", "init_cache", "training_flops_per_token")
