"""Next-token selection: greedy, or sampled with temperature, top-k, top-p and a repetition
penalty, on (B, V) logits under `jit`.

The processors run in Hugging Face's order: repetition penalty, temperature, top-k, top-p
(on the top-k tokens' renormalised distribution), then a categorical draw. Their values
are traced arrays (`SamplingParams.arrays`), so one compiled decode step serves any of them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; the defaults are the paper's (DESIGN.md §1).

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 keep every token; a
    repetition_penalty of 1 leaves the logits as they are.
    """
    temperature: float = 0.7
    top_k: int = 100
    top_p: float = 0.8
    repetition_penalty: float = 1.05

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0: greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1: off)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1: off)")

    @property
    def is_greedy(self) -> bool:
        """Plain argmax: no temperature and no penalty (top-k / top-p cannot change an argmax)."""
        return self.temperature == 0 and self.repetition_penalty == 1

    def arrays(self) -> dict[str, jax.Array]:
        return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p), "repetition_penalty": jnp.float32(self.repetition_penalty)}


GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL's penalty as Hugging Face applies it: the logits of tokens already in the sequence
    (`seen`, (B, V) bool) are divided by `penalty` when positive, multiplied when negative."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def _ranks(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, ranks): token ids by falling logit, and each token's place in that order
    (ties: the lower id first)."""
    order = jnp.argsort(-logits, axis=-1, stable=True)
    return order, jnp.argsort(order, axis=-1)


def top_k_mask(logits: jax.Array, k) -> jax.Array:
    """True on exactly the k largest logits of each row; k <= 0 keeps every token."""
    _, ranks = _ranks(logits)
    return (ranks < k) | (k <= 0)


def top_p_mask(logits: jax.Array, p) -> jax.Array:
    """True on the smallest set of most probable tokens whose probability mass is >= p
    (nucleus sampling): a token stays while the mass ranked above it is still below p."""
    order, ranks = _ranks(logits)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return jnp.take_along_axis(mass_above < p, ranks, axis=-1)


def sample(key: jax.Array, logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """(B,) int32 tokens drawn from `logits` (B, V) after temperature, top-k and top-p;
    temperature 0: the argmax."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    keep = top_k_mask(scaled, top_k)
    scaled = jnp.where(keep, scaled, -jnp.inf)
    keep &= top_p_mask(scaled, top_p)
    drawn = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def seen_tokens(tokens: jax.Array, segment_ids: jax.Array, vocab_size: int) -> jax.Array:
    """(B, V) bool: the ids in each row's prompt (padding, segment 0, left out)."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    seen = jnp.zeros((tokens.shape[0], vocab_size), bool)
    return seen.at[rows, tokens].max(segment_ids > 0)


def valid_logits(logits: jax.Array, num_valid: int) -> jax.Array:
    """-inf from id `num_valid` on: the embedding's padding rows, which the tokenizer cannot decode."""
    return jnp.where(jnp.arange(logits.shape[-1]) < num_valid, logits, -jnp.inf)


def make_greedy_select(num_valid: int):
    """select(logits, carry) -> (argmax among the first `num_valid` ids, carry)."""
    def select(logits, carry):
        return jnp.argmax(valid_logits(logits, num_valid), -1).astype(jnp.int32), carry
    return select


def make_sampled_select(num_valid: int):
    """select(logits, carry) -> (token, carry) for `decoding.make_decoder`: penalty, then
    `sample`, among the first `num_valid` ids. carry: {"key", "seen" (B, V) bool,
    **SamplingParams.arrays()}."""
    def select(logits, carry):
        logits = logits.astype(jnp.float32)
        logits = valid_logits(logits, num_valid)
        logits = apply_repetition_penalty(logits, carry["seen"], carry["repetition_penalty"])
        key, draw_key = jax.random.split(carry["key"])
        token = sample(draw_key, logits, carry["temperature"], carry["top_k"], carry["top_p"])
        seen = carry["seen"].at[jnp.arange(token.shape[0]), token].set(True)
        return token, {**carry, "key": key, "seen": seen}
    return select
