"""Multi-turn chat with a trained run in the terminal (or fed on stdin).

    m2omni-chat --config=configs/tiny.py --workdir=/tmp/m2omni_tiny [--system="..."] [--out_dir=DIR]
        [--greedy | --temperature=T --top_p=P --top_k=K --repetition_penalty=R] [--seed=S]

Each line is a user turn; the reply streams as it is generated and joins the conversation.
Commands:
    /image PATH   attach an image (PNG, JPEG, ...) to the next turn
    /audio PATH   attach an audio clip (WAV; FLAC, OGG with soundfile) to the next turn
    /reset        forget the conversation and any pending attachments
    /help         list these commands
    /quit         leave (as does end of input)
Images and speech the model's output heads make are written to --out_dir (default
`workdir/outputs`). A missing, unreadable or unsupported file, or a conversation longer than
the model's context, is a one-line error on stderr naming it; the chat goes on. The sampling
flags are m2omni-generate's (the paper's defaults).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

from etils import epath

from m2omni_jax import cli, faults, generate as generate_lib
from m2omni_jax.data import records

NAME = "m2omni-chat"
COMMANDS = ("/image", "/audio", "/reset", "/help", "/quit")
_LOADERS = {"image": records.load_image, "audio": records.load_audio}


@dataclasses.dataclass
class Conversation:
    """The turns so far, every attached file (in placeholder order) and the next turn's files."""
    system: str = ""
    messages: list = dataclasses.field(default_factory=list)
    images: list = dataclasses.field(default_factory=list)
    audio: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)  # (kind, path)

    def user_turn(self, text: str) -> dict:
        """The record with `text` as the next user turn, the pending files before it."""
        content = "".join(f"<{kind}>" for kind, _ in self.pending) + text
        system = [{"role": "system", "content": self.system}] if self.system else []
        images = self.images + [p for k, p in self.pending if k == "image"]
        audio = self.audio + [p for k, p in self.pending if k == "audio"]
        return {"messages": system + self.messages + [{"role": "user", "content": content}],
                "images": [records.load_image(p) for p in images], "audio": audio}

    def commit(self, record: dict, reply: str) -> None:
        self.messages = record["messages"][1 if self.system else 0:] + [{"role": "assistant", "content": reply}]
        self.images += [p for k, p in self.pending if k == "image"]
        self.audio += [p for k, p in self.pending if k == "audio"]
        self.pending = []


def chat_loop(generator, sampling, lines: TextIO, out: TextIO, err: TextIO, *, max_new_tokens: int = 0,
              seed: int = 0, out_dir: str | None = None, system: str = "") -> int:
    """Reads turns and commands from `lines` until `/quit` or its end; replies to `out`,
    errors to `err` (one line each, the chat goes on). Returns the number of replies."""
    conversation, replies = Conversation(system), 0
    prompt = lines.isatty() and out.isatty()
    while True:
        if prompt:
            out.write("> "), out.flush()
        line = lines.readline()
        if not line or line.strip() == "/quit":
            return replies
        line = line.strip()
        try:
            if line.startswith("/"):
                conversation = command(conversation, line, out)
            elif line:
                record = conversation.user_turn(line)
                reply = generate_lib.generate_reply(generator, record, sampling, max_new_tokens, seed + replies,
                                                    out=out, out_dir=out_dir)
                conversation.commit(record, reply)
                replies += 1
        except faults.ConfigError as e:
            print(f"{NAME}: {e}", file=err, flush=True)


def command(conversation: Conversation, line: str, out: TextIO) -> Conversation:
    """Applies one `/command [argument]`; a bad one is a `ConfigError`."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/image", "/audio"):
        kind = name[1:]
        if not argument:
            raise faults.ConfigError(f"{name} needs a file: {name} PATH")
        generate_lib.check_file(kind, argument, _LOADERS[kind], label=f"{name} {argument}")
        conversation.pending.append((kind, argument))
        out.write(f"[attached {kind} {argument} to the next turn]\n")
        return conversation
    if name == "/reset":
        out.write("[conversation reset]\n")
        return Conversation(conversation.system)
    if name == "/help":
        out.write(__doc__.split("Commands:\n")[1].split("Images and")[0])
        return conversation
    raise faults.ConfigError(f"unknown command {name!r}; use one of {', '.join(COMMANDS)}")


def chat(config, workdir: str) -> int:
    flags_ = generate_lib.FLAGS
    sampling = generate_lib.sampling_from_flags()
    if flags_.max_new_tokens < 0:
        raise faults.ConfigError(f"--max_new_tokens={flags_.max_new_tokens} must be >= 0 (0: as many as fit)")
    generator = generate_lib.load_generator(config, workdir)
    out_dir = flags_.out_dir or str(epath.Path(workdir) / "outputs")
    return chat_loop(generator, sampling, sys.stdin, sys.stdout, sys.stderr, max_new_tokens=flags_.max_new_tokens,
                     seed=flags_.seed, out_dir=out_dir, system=flags_.system)


def run():
    cli.run(chat, NAME, quiet=True, help_from=(generate_lib.__name__,))


if __name__ == "__main__":
    run()
