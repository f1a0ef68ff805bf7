"""The KV-cache decoder every generating command shares (m2omni-eval, m2omni-generate).

One prefill call runs the (left-padded) prompts and writes the cache; then one compiled
step per new token, driven by a host-side loop that yields each step's tokens as they
arrive, so a caller can stream them. The loop dispatches step i+1 before it reads token i
(JAX's async dispatch: the host's copy and the caller's work overlap the device's next
step), and each step donates the cache it replaces. What picks the next token from the last logits is a
`select(logits (B, V), carry) -> (tokens (B,), carry)` function (`greedy_select`, or
`sampling.make_sampled_select`); `carry` is its state (a PRNG key, the seen tokens).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.data import chat, media
from m2omni_jax.models import omni
from m2omni_jax.models.omni import init_cache

Select = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def greedy_select(logits, carry):
    return jnp.argmax(logits, -1).astype(jnp.int32), carry


def make_decoder(model, max_len: int, select: Select = greedy_select,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, chunk: int = 1):
    """Returns steps(params, prompt_inputs, next_position, num_new, stop_ids=(), carry=None),
    an iterator of (B,) int32 numpy tokens, one per step, that ends after `num_new` tokens or
    once every row has produced one of `stop_ids` (a row's tokens after its stop are junk).

    prompt_inputs: the model's inputs for the left-padded prompts, tokens (B, L), positions
    (3, B, L), segment_ids (B, L) (+ media keys). The cache holds `max_len` positions. New
    token i is fed back at M-RoPE position next_position + i (t = h = w, text after the
    prompt). `context` is entered around each device call (e.g. the mesh and its rules).
    chunk > 1: up to `chunk` steps per device call (a `lax.scan` of a power of two of them),
    so the per-token dispatch is paid once per chunk; tokens still come one step at a time,
    in bursts, and a stop is seen at the end of its chunk.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")

    def apply(params, cache, inputs):
        return model.apply({"params": params, "cache": cache}, **inputs, decode=True, mutable=["cache"])

    @jax.jit
    def prefill(params, inputs, carry):
        cache = init_cache(model, inputs["tokens"].shape[0], max_len)
        logits, variables = apply(params, cache, inputs)
        token, carry = select(logits[:, -1], carry)
        return token, variables["cache"], carry

    def step_fn(params, cache, token, position, carry):
        inputs = {"tokens": token[:, None], "positions": jnp.broadcast_to(position[None, :, None], (3,) + token.shape + (1,)),
                  "segment_ids": jnp.ones((token.shape[0], 1), jnp.int32)}
        logits, variables = apply(params, cache, inputs)
        token, carry = select(logits[:, -1], carry)
        return token, variables["cache"], carry

    step = jax.jit(step_fn, donate_argnums=(1,))  # the old cache's buffers hold the new one

    @functools.partial(jax.jit, static_argnums=(5,), donate_argnums=(1,))
    def multi_step(params, cache, token, position, carry, length: int):
        def body(state, i):
            token, cache, carry = step_fn(params, state[1], state[0], position + i, state[2])
            return (token, cache, carry), token
        (token, cache, carry), tokens = jax.lax.scan(body, (token, cache, carry), jnp.arange(length, dtype=jnp.int32))
        return tokens, token, cache, carry

    def dispatch(params, cache, token, position, carry, length: int):
        """(tokens (length, B), last token, cache, carry) of the next `length` steps."""
        if length == 1:
            token, cache, carry = step(params, cache, token, position, carry)
            return token[None], token, cache, carry
        return multi_step(params, cache, token, position, carry, length)

    def steps(params, prompt_inputs, next_position, num_new: int, stop_ids: Sequence[int] = (),
              carry=None) -> Iterator[np.ndarray]:
        if num_new < 1:
            raise ValueError(f"num_new={num_new} new tokens; decode at least 1")
        prompt_len = prompt_inputs["tokens"].shape[1]
        if prompt_len + num_new - 1 > max_len:
            raise ValueError(f"a prompt of {prompt_len} positions + {num_new} new tokens exceeds the cache's "
                             f"{max_len} (+1: the last token is never fed back)")
        next_position = np.asarray(next_position)
        with context():
            token, cache, carry = prefill(params, prompt_inputs, carry)
        done = np.zeros(token.shape[0], bool)
        ready, fed = token[None], 0  # tokens not yet read; steps dispatched
        while True:
            length = min(chunk, num_new - 1 - fed)
            if length:  # the next steps go to the device before the ready tokens are read
                length = 1 << (length.bit_length() - 1)  # chunk, or the tail in powers of two
                with context():
                    block, token, cache, carry = dispatch(params, cache, token,
                                                          jnp.asarray(next_position + fed, jnp.int32), carry, length)
                fed += length
            for tokens in np.asarray(ready):
                yield tokens
                done |= np.isin(tokens, stop_ids)
                if done.all():
                    return
            if not length:
                return
            ready = block
    return steps


def make_greedy_decoder(model, max_len: int, chunk: int = 1):
    """Returns decode(params, prompt_inputs, next_position, num_new, stop_ids=()) -> (B, num_new)
    greedy token ids (zero after the step at which every row had stopped); see `make_decoder`."""
    steps = make_decoder(model, max_len, chunk=chunk)

    def decode(params, prompt_inputs, next_position, num_new: int, stop_ids: Sequence[int] = ()):
        tokens = np.stack(list(steps(params, prompt_inputs, next_position, num_new, stop_ids)), 1)
        return np.pad(tokens, ((0, 0), (0, num_new - tokens.shape[1])))
    return decode


def prompt_inputs(config, prompts: Sequence[dict], prompt_len: int, vision_opts: media.VisionOptions,
                  audio_opts: media.AudioOptions | None) -> tuple[dict, np.ndarray]:
    """(model inputs, next_position (B,)) of assembled prompts (`chat.assemble_chat` with the
    generation prompt), left-padded to `prompt_len`, their media packed to the row sizes."""
    batch = chat.batch_prompts(prompts, prompt_len, int(config.data.vision.patches_per_row), audio_opts,
                               max_segments_per_row=vision_opts.max_segments_per_row)
    next_position = batch.pop("next_position")
    keys = ("tokens", "segment_ids", "positions") + (omni.MEDIA_KEYS if omni.is_omni(config) else ())
    inputs = {k: v for k, v in batch.items() if k in keys}
    inputs["positions"] = np.moveaxis(inputs["positions"], 1, 0)
    return inputs, next_position


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """`ids` up to (without) the first stop id."""
    ids = list(ids)
    stops = [i for i, t in enumerate(ids) if t in stop_ids]
    return ids[:stops[0]] if stops else ids
