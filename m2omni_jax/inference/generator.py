"""Generator: conversations in the omni record format in, generated text (and what any
registered output head makes of `<gen_image>` / `<gen_audio>` spans) out.

    generator = Generator(model, params, tokenizer, config)  # or generate.load_generator(config, workdir)
    [reply] = generator.generate([{"messages": [{"role": "user", "content": "<image>What is this?"}],
                                   "images": ["photo.png"]}])
    for segment in generator.generate_stream("Tell me a story.", SamplingParams(), seed=1):
        print(segment.text, end="")

Conversations are records (`data/records.py`: messages with `<image>` / `<video>` / `<audio>`
placeholders, media as arrays or file paths) or plain strings (one user turn). A batch is
assembled with the assistant header open, left-padded to a length bucket and decoded
together under the mesh by the shared KV-cache decoder (`decoding.make_decoder`): one
prefill, then one compiled step per token. The cache holds `config.data.seq_len`
positions, the model's context: prompt + new tokens must fit in it. Generation ends at
`<|eot_id|>` or eos, or after `max_new_tokens`.

With the image head (`config.model.image_head.enabled`), a completed `<gen_image> … </gen_image>`
span is drawn by the model itself (`ImageOutputHead`): the prompt, the reply so far and the
span go through the model once more (`ImageDrawer`), the hidden states over the span condition
the flow-matching head, and the `HeadSegment`'s output is a uint8 (H, W, 3) image. On the
query route the span holds the `<gen_imagePatch>` queries the model was trained to write.

With `<audio_k>` tokens (`config.tokenizer.audio_codes`) and a trained speech decoder
(`config.speech_tokenizer.workdir`), a `<gen_audio>` span is spoken as it is written
(`speech_output.SpeechOutputHead`): audio `HeadSegment`s (`final=False`) arrive while the LLM
is still generating, the last (`final=True`) at `</gen_audio>`; their waveforms joined are the
utterance (16 kHz).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.data import chat, media
from m2omni_jax.inference import decoding, sampling as sampling_lib, speech_output
from m2omni_jax.inference.sampling import SamplingParams
from m2omni_jax.inference.streaming import OutputHead, Segment, SegmentStream, TextSegment, registered_output_heads
from m2omni_jax.models import omni
from m2omni_jax.parallel import sharding

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this: few prefill compiles
STOP_TOKENS = ("<|eot_id|>",)  # and the tokenizer's eos
DECODE_CHUNK = 8  # decode steps per device call (decoding.make_decoder): tokens stream in bursts of up to 8


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str  # the text segments joined
    segments: tuple[Segment, ...]
    token_ids: tuple[int, ...]  # the generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token) | "length" (max_new_tokens)


@dataclasses.dataclass(frozen=True)
class _Finished:
    token_ids: tuple[int, ...]
    reason: str


class Generator:
    """Batched generation with one model and its parameters (see the module docstring).

    heads: {kind: head} for `<gen_{kind}>` spans (`streaming.register_output_head`); None:
    the registered ones. mesh / rules: default from `config.mesh` / `config.sharding_rules`.
    stop_ids: the ids that end a reply; None: `<|eot_id|>` and eos.
    """

    def __init__(self, model, params, tokenizer, config, *, mesh=None, rules=None,
                 heads: Mapping[str, OutputHead] | None = None, stop_ids: Sequence[int] | None = None):
        self.model, self.params, self.tokenizer, self.config = model, params, tokenizer, config
        self.mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
        self.rules = tuple(rules or config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
        self.vision_opts = media.VisionOptions.from_config(config)
        self.audio_opts = media.AudioOptions.from_config(config)  # None without the audio tower
        self.max_len = int(config.data.seq_len)
        if stop_ids is None:
            stop_ids = [tokenizer.special_id(t) for t in STOP_TOKENS] + [tokenizer.eos_id]
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.heads = registered_output_heads() if heads is None else dict(heads)
        if heads is None and omni.image_output_enabled(config):
            self.heads["image"] = ImageOutputHead(self)
        if heads is None and "audio" not in self.heads and speech_output.configured(config, tokenizer):
            self.heads["audio"] = speech_output.load_speech_head(config, tokenizer.audio, max_tokens=self.max_len)
        self._decoders = {}  # greedy? -> decoding.make_decoder's steps

    def generate(self, conversations: Sequence[dict | str], sampling: SamplingParams = SamplingParams(), *,
                 max_new_tokens: int = 256, seed: int | jax.Array = 0,
                 stop_ids: Sequence[int] | None = None) -> list[Generation]:
        """One `Generation` per conversation, decoded as one batch. seed: an int or a PRNG
        key; stop_ids: None: the generator's."""
        segments = [[] for _ in conversations]
        out = [None] * len(conversations)
        prepared = self._prepare(conversations, max_new_tokens)
        for row, item in self._decode(prepared, sampling, max_new_tokens, seed, stop_ids):
            if isinstance(item, _Finished):
                text = "".join(s.text for s in segments[row] if isinstance(s, TextSegment))
                out[row] = Generation(text, tuple(segments[row]), item.token_ids, item.reason)
            else:
                segments[row].append(item)
        return out

    def generate_stream(self, conversation: dict | str, sampling: SamplingParams = SamplingParams(), *,
                        max_new_tokens: int = 256, seed: int | jax.Array = 0,
                        stop_ids: Sequence[int] | None = None) -> Iterator[Segment]:
        """The segments of one conversation's reply as its tokens arrive (arguments as
        `generate`). A conversation the model cannot take (media, length) raises here,
        before the first segment."""
        prepared = self._prepare([conversation], max_new_tokens)
        events = self._decode(prepared, sampling, max_new_tokens, seed, stop_ids)
        return (item for _, item in events if not isinstance(item, _Finished))

    def prompt(self, conversation: dict | str) -> dict:
        """The assembled prompt (`chat.assemble_chat`, assistant header open) of a conversation."""
        record = as_record(conversation)
        check_media(record, omni.is_omni(self.config))
        messages = record["messages"]
        items = media.record_media(record, self.vision_opts, messages, self.audio_opts)
        return chat.assemble_chat(self.tokenizer, messages, items, add_generation_prompt=True)

    def _prepare(self, conversations, max_new_tokens: int) -> tuple[int, dict, np.ndarray]:
        """(number of conversations, model inputs, next_position); a ValueError for what cannot run."""
        if not conversations:
            raise ValueError("no conversations to generate for")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        prompts = [self.prompt(c) for c in conversations]
        self._last_prompts = prompts  # the drawing head's context (`ImageOutputHead`)
        return (len(prompts),) + self._batch(prompts, max_new_tokens)

    def _decode(self, prepared, sampling: SamplingParams, max_new_tokens: int, seed, stop_ids):
        """(row, segment) as each row's tokens arrive; last per row (row, _Finished)."""
        num_rows, inputs, next_position = prepared
        stop_ids = self.stop_ids if stop_ids is None else tuple(int(i) for i in stop_ids)
        prompts = self._last_prompts
        streams = [SegmentStream(self.tokenizer, self.heads, prompts[row]["ids"]) for row in range(num_rows)]
        ids = [[] for _ in range(num_rows)]
        live = set(range(num_rows))
        for tokens in self._token_steps(inputs, next_position, sampling, max_new_tokens, seed, stop_ids):
            for row in sorted(live):
                token = int(tokens[row])
                if token in stop_ids:
                    live.discard(row)
                    yield from ((row, s) for s in streams[row].finish())
                    yield row, _Finished(tuple(ids[row]), "stop")
                    continue
                ids[row].append(token)
                yield from ((row, s) for s in streams[row].push(token))
            if not live:  # the batch's padding rows may still run; nobody reads them
                break
        for row in sorted(live):
            yield from ((row, s) for s in streams[row].finish())
            yield row, _Finished(tuple(ids[row]), "length")

    def _batch(self, prompts: Sequence[dict], max_new_tokens: int) -> tuple[dict, np.ndarray]:
        room = self.max_len - max_new_tokens + 1  # the last new token is never fed back
        longest = max(len(p["ids"]) for p in prompts)
        if longest > room:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"context, config.data.seq_len={self.max_len}")
        patches = max(len(p["patches"]) for p in prompts)
        if patches > int(self.config.data.vision.patches_per_row):
            raise ValueError(f"the images / video of a prompt make {patches} patches; config.data.vision."
                             f"patches_per_row={self.config.data.vision.patches_per_row} (lower the resolution)")
        prompt_len = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, room)
        ways = sharding.batch_axis_size(self.mesh)
        rows = -(-len(prompts) // ways) * ways  # a multiple of the batch mesh axes
        padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
        return decoding.prompt_inputs(self.config, padded, prompt_len, self.vision_opts, self.audio_opts)

    def _token_steps(self, inputs, next_position, sampling: SamplingParams, max_new_tokens: int, seed, stop_ids):
        greedy = sampling.is_greedy
        if greedy not in self._decoders:
            make_select = sampling_lib.make_greedy_select if greedy else sampling_lib.make_sampled_select
            select = make_select(self.tokenizer.vocab_size)
            self._decoders[greedy] = decoding.make_decoder(
                self.model, self.max_len, select, context=lambda: sharding.activate(self.mesh, self.rules),
                chunk=DECODE_CHUNK)
        carry = None
        if not greedy:
            key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
            seen = sampling_lib.seen_tokens(inputs["tokens"], inputs["segment_ids"],
                                            int(self.config.model.llm.vocab_size))
            carry = {"key": key, "seen": seen, **sampling.arrays()}
        return self._decoders[greedy](self.params, inputs, next_position, max_new_tokens, stop_ids, carry)


def continue_prompt(prompt: dict, new_ids: Sequence[int]) -> dict:
    """An assembled prompt (`chat.assemble_chat`) + the ids generated after it: text whose
    M-RoPE positions continue from the prompt's."""
    new_ids = np.asarray(new_ids, np.int32)
    start = int(prompt["positions"].max(initial=-1)) + 1
    positions = np.tile(np.arange(start, start + len(new_ids), dtype=np.int32), (3, 1))
    return {**prompt, "ids": np.concatenate([prompt["ids"], new_ids]),
            "positions": np.concatenate([prompt["positions"], positions], axis=1)}


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255]."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ImageDrawer:
    """draw(params, sequences, seed) -> uint8 (n, H, W, 3): each assembled sequence (prompt +
    reply, `continue_prompt`) through the model, its first `<gen_image>` span's hidden states
    conditioning the image head (none: drawn unconditionally). Sequences are left-padded to
    `config.data.seq_len` in batches of `batch_size` rows: one compiled program."""

    def __init__(self, model, tokenizer, config, mesh, rules, batch_size: int):
        self.model, self.config, self.mesh, self.rules = model, config, mesh, rules
        ways = sharding.batch_axis_size(mesh)
        self.batch_size = -(-batch_size // ways) * ways
        self.length = int(config.data.seq_len)
        self.span_ids = (tokenizer.special_id("<gen_image>"), tokenizer.special_id("</gen_image>"))
        self.vision_opts = media.VisionOptions.from_config(config)
        self.audio_opts = media.AudioOptions.from_config(config, read_cmvn=False)
        self.slots = model.config.image_head.images_per_row

        def run(params, inputs, cond, rng):
            _, hidden = model.apply({"params": params}, **inputs, gen_image_cond=cond, return_hidden=True)
            return model.apply({"params": params}, hidden, cond, rng, method=omni.OmniModel.draw)
        self._run = jax.jit(run)

    def __call__(self, params, sequences: Sequence[dict], seed: int = 0) -> np.ndarray:
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = list(sequences[start:start + self.batch_size])
            padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))
            inputs, _ = decoding.prompt_inputs(self.config, padded, self.length, self.vision_opts, self.audio_opts)
            cond = np.zeros((len(padded), self.length), np.int32)
            for row, seq in enumerate(padded):
                slots = first_span(seq["ids"], *self.span_ids)
                cond[row, self.length - len(slots):] = slots
            rng = jax.random.fold_in(jax.random.key(seed), start)
            with sharding.activate(self.mesh, self.rules):
                images = self._run(params, inputs, jnp.asarray(cond), rng)
            out.append(to_uint8(images[::self.slots][:len(chunk)]))
        return np.concatenate(out)


def first_span(ids: Sequence[int], open_id: int, close_id: int) -> np.ndarray:
    """(L,) int32: 1 at the tokens after the first `open_id`, up to its `close_id` (or the end:
    a reply cut short still draws from what it wrote); 0 elsewhere, and everywhere without one."""
    ids = np.asarray(ids)
    out = np.zeros(len(ids), np.int32)
    opens = np.flatnonzero(ids == open_id)
    if len(opens):
        start = opens[0] + 1
        closes = np.flatnonzero(ids[start:] == close_id)
        out[start:start + (closes[0] if len(closes) else len(ids))] = 1
    return out


class ImageOutputHead:
    """The `<gen_image>` output head of a generator whose model draws (see the module docstring)."""
    takes_context = True

    def __init__(self, generator: "Generator", seed: int = 0):
        self.generator, self.seed = generator, seed
        self.drawer = None

    def __call__(self, token_ids: Sequence[int], text: str, context: Sequence[int] = ()) -> np.ndarray:
        del text
        g = self.generator
        if self.drawer is None:
            self.drawer = ImageDrawer(g.model, g.tokenizer, g.config, g.mesh, g.rules, batch_size=1)
        # The row's prompt (its media too): the one the context starts with.
        prompt = next(p for p in g._last_prompts if tuple(context[:len(p["ids"])]) == tuple(p["ids"]))
        span = [g.tokenizer.special_id("<gen_image>"), *token_ids, g.tokenizer.special_id("</gen_image>")]
        reply = list(context[len(prompt["ids"]):]) + span
        return self.drawer(g.params, [continue_prompt(prompt, reply)], self.seed)[0]


def as_record(conversation: dict | str) -> dict:
    """A record (`records.py`) of a conversation: a plain string is one user turn."""
    if isinstance(conversation, str):
        return {"messages": [{"role": "user", "content": conversation}]}
    if not isinstance(conversation, Mapping) or not conversation.get("messages"):
        raise ValueError("a conversation is a str or a record with 'messages' (data/records.py), "
                         f"got {type(conversation).__name__}")
    return dict(conversation)


def check_media(record: dict, has_vision: bool) -> None:
    """The placeholders and the media lists agree, and the model can read them."""
    counts = collections.Counter(kind for m in record["messages"] for kind in media.PLACEHOLDER.findall(m["content"]))
    given = {"image": len(record.get("images", [])), "audio": len(record.get("audio", [])),
             "video": int(len(record.get("video", [])) > 0)}
    for kind, count in given.items():
        if counts[kind] != count:
            raise ValueError(f"the conversation has {counts[kind]} <{kind}> placeholder(s) but {count} {kind} "
                             f"item(s) (a video is one item: its frames)")
    if not has_vision and (counts["image"] or counts["video"] or counts["audio"]):
        raise ValueError("this model reads text only (config.model.kind='llm'); drop the images / video / audio")
