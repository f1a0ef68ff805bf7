"""Generated tokens -> typed segments, as they arrive.

Text streams as `TextSegment`s. A `<gen_image> … </gen_image>` or `<gen_audio> … </gen_audio>`
span goes to the output head registered for its kind (`register_output_head`), which turns
the span's tokens into an image or a waveform (`HeadSegment`): the paper's decoupled image
generation renders the caption inside `<gen_image>`; its speech decoder turns the audio
codes inside `<gen_audio>` into a waveform. A span with no head flows on as text, markers
included, so a text-only model's stream is only text. A head with `takes_context = True`
(the omni model's own image head, `generator.ImageOutputHead`: it conditions on the LLM's
hidden states over the span) is also given `context`: the row's prompt ids and every token
before the span. A streaming head (one with `open()`, e.g. `speech_output.SpeechOutputHead`)
gets the span's tokens one by one through the session `open()` returns (`push(id)` -> outputs,
`close()` -> the last outputs): each output is a `HeadSegment` with `final=False` as it comes,
the close's last one `final=True` (a span cut short by the token budget is closed at `finish`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

OUTPUT_KINDS = ("image", "audio")  # the `<gen_{kind}>` spans


@dataclasses.dataclass(frozen=True)
class TextSegment:
    text: str


@dataclasses.dataclass(frozen=True)
class HeadSegment:
    """What an output head made of one `<gen_{kind}>` span."""
    kind: str  # "image" | "audio"
    output: Any  # the head's result: an image array, a waveform, ...
    token_ids: tuple[int, ...]  # the span's tokens between its markers (a streamed piece: those since the last)
    text: str  # those tokens as text (the caption of an image span)
    final: bool = True  # False: a piece of a span still open (a streaming head's); its pieces joined are the output


Segment = TextSegment | HeadSegment
# head(token_ids, text) -> output, for the tokens between `<gen_{kind}>` and `</gen_{kind}>`.
OutputHead = Callable[[Sequence[int], str], Any]

_HEADS: dict[str, OutputHead] = {}


def register_output_head(kind: str, head: OutputHead) -> None:
    """Makes `head` render every `<gen_{kind}>` span of the generators made afterwards."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output head kind={kind!r}; use one of {OUTPUT_KINDS}")
    _HEADS[kind] = head


def registered_output_heads() -> dict[str, OutputHead]:
    return dict(_HEADS)


class SegmentStream:
    """One row's tokens in (`push`), its segments out, text as soon as it decodes cleanly."""

    def __init__(self, tokenizer, heads: Mapping[str, OutputHead], prefix: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._seen = [int(i) for i in prefix]  # the prompt and every token pushed
        self._heads = dict(heads)
        unknown = sorted(set(self._heads) - set(OUTPUT_KINDS))
        if unknown:
            raise ValueError(f"output heads {unknown}; kinds are {OUTPUT_KINDS}")
        self._opens = {tokenizer.special_id(f"<gen_{k}>"): k for k in self._heads}
        self._closes = {k: tokenizer.special_id(f"</gen_{k}>") for k in self._heads}
        self._text_ids: list[int] = []  # the text run since the last span
        self._shown = ""  # what of its text was streamed
        self._span: tuple[str, list[int]] | None = None  # an open span: its kind and tokens
        self._session = None  # a streaming head's open span
        self._unsent: list[int] = []  # the open streaming span's tokens not in a segment yet

    def push(self, token_id: int) -> list[Segment]:
        """The segments that `token_id` completes (often none, or one piece of text)."""
        token_id = int(token_id)
        self._seen.append(token_id)
        if self._span is not None:
            kind, ids = self._span
            if token_id != self._closes[kind]:
                ids.append(token_id)
                return self._stream_piece(kind, token_id)
            if self._session is not None:
                return self._close_session(kind)
            self._span = None
            text = self._tokenizer.decode(ids)
            head = self._heads[kind]
            if getattr(head, "takes_context", False):
                output = head(tuple(ids), text, context=tuple(self._seen[:-len(ids) - 2]))
            else:
                output = head(tuple(ids), text)
            return [HeadSegment(kind, output, tuple(ids), text)]
        if token_id in self._opens:
            segments = self._flush()
            kind = self._opens[token_id]
            self._span = (kind, [])
            opener = getattr(self._heads[kind], "open", None)
            self._session = opener() if opener is not None else None
            return segments
        self._text_ids.append(token_id)
        return self._new_text(final=False)

    def finish(self) -> list[Segment]:
        """The text still held back; an unclosed span flows on as text (a streaming head's is
        closed instead: what it made of the tokens so far)."""
        if self._session is not None:
            return self._close_session(self._span[0])
        if self._span is not None:
            kind, ids = self._span
            self._span = None
            self._text_ids = [self._tokenizer.special_id(f"<gen_{kind}>")] + ids
            self._shown = ""
        return self._flush()

    def _stream_piece(self, kind: str, token_id: int) -> list[Segment]:
        if self._session is None:
            return []
        self._unsent.append(token_id)
        return self._pieces(kind, self._session.push(token_id), final=False)

    def _close_session(self, kind: str) -> list[Segment]:
        outputs, self._session, self._span = self._session.close(), None, None
        return self._pieces(kind, outputs, final=True)

    def _pieces(self, kind: str, outputs, final: bool) -> list[Segment]:
        """Each output a segment holding the tokens since the last (the first one gets them)."""
        segments = []
        for i, output in enumerate(outputs):
            ids, self._unsent = tuple(self._unsent), []
            last = final and i == len(outputs) - 1
            segments.append(HeadSegment(kind, output, ids, self._tokenizer.decode(ids) if ids else "", last))
        return segments

    def _flush(self) -> list[Segment]:
        segments = self._new_text(final=True)
        self._text_ids, self._shown = [], ""
        return segments

    def _new_text(self, final: bool) -> list[Segment]:
        text = self._tokenizer.decode(self._text_ids)
        # A byte-fallback character decodes as U+FFFD until its last byte arrives; and a
        # piece may change how the text before it decodes: hold back until it settles.
        if not text.startswith(self._shown) or (not final and text.endswith("\ufffd")):
            return []
        new, self._shown = text[len(self._shown):], text
        return [TextSegment(new)] if new else []
