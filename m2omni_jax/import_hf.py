"""Hugging Face checkpoints in and out.

    m2omni-import --hf=/models/Llama-3.1-8B --out=/runs/llama_init [--layout=omni] [--param_dtype=bfloat16]
    m2omni-import --export --ckpt=/runs/stage3 --out=/models/ours_hf [--llm_config=FILE.json] [--dtype=bfloat16]

Import reads a local folder (config.json + model.safetensors, or shards with their
index) of LlamaForCausalLM, Qwen2ForCausalLM or Qwen2VLForConditionalGeneration (LLM +
ViT) and writes `<out>/checkpoints/0/`, the checkpoint `config.init_from=<out>` starts a
run from, and `<out>/model_config.json`: the config.model fields (kind, llm, vision) and
config.tokenizer the parameters fit. A tokenizer.json in the folder is written to `<out>`
with our special tokens added (the embedding grows when they are new). --layout=omni
nests a text model's LLM under "llm", for an omni run.

Export writes the LLM of a workdir's latest checkpoint (an LLM run's, or an omni run's
LLM tower) as an LlamaForCausalLM folder (Qwen2ForCausalLM with q/k/v biases) that
`transformers.AutoModelForCausalLM.from_pretrained` loads; the LLM config is read from
--llm_config (default `<ckpt>/model_config.json`). An unsupported architecture or field,
or a missing file, is a one-line error naming it (exit 2 / 1).
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from m2omni_jax import faults
from m2omni_jax.config_fields import ConfigError

NAME = "m2omni-import"

flags.DEFINE_string("hf", None, "Import: the Hugging Face model folder to read.")
flags.DEFINE_string("out", None, "Where to write: our checkpoint directory (import), an HF folder (--export).")
flags.DEFINE_bool("export", False, "Write our LLM (--ckpt) as an HF folder instead.")
flags.DEFINE_string("ckpt", None, "Export: the workdir (or its checkpoints/) whose latest checkpoint to read.")
flags.DEFINE_string("llm_config", None, "Export: JSON of the LLM config (default <ckpt>/model_config.json).")
flags.DEFINE_enum("layout", "auto", ["auto", "llm", "omni"], "Import: the param tree: auto (llm for a text "
                  "model, omni for Qwen2-VL), llm, or omni (the LLM under 'llm').")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Import: dtype of the stored parameters.")
flags.DEFINE_bool("scan_layers", True, "Import: stack the layers for nn.scan (model.llm.scan_layers).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Export: dtype of the safetensors.")
FLAGS = flags.FLAGS


def convert() -> None:
    from m2omni_jax.interop import convert as convert_lib  # after flag parsing (JAX flags apply)

    if FLAGS.export:
        _require("ckpt", "out")
        files = convert_lib.export_checkpoint(FLAGS.ckpt, FLAGS.out, llm_config=FLAGS.llm_config, dtype=FLAGS.dtype)
        print(f"wrote {FLAGS.out}: {', '.join(files)}")
        return
    _require("hf", "out")
    written = convert_lib.import_folder(FLAGS.hf, FLAGS.out, layout=FLAGS.layout, param_dtype=FLAGS.param_dtype,
                                        scan_layers=FLAGS.scan_layers)
    print(f"wrote {FLAGS.out}/checkpoints/0 and {FLAGS.out}/{convert_lib.MODEL_CONFIG}; start a run with "
          f"--config.init_from={FLAGS.out} and these model fields:")
    print(json.dumps(written["model"], indent=2))


def _require(*names: str) -> None:
    for name in names:
        if not FLAGS[name].value:
            raise ConfigError(f"--{name} is required{' with --export' if FLAGS.export else ''}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        convert()
    except (ConfigError, faults.RunError, FileNotFoundError) as e:
        print(f"{NAME}: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def run() -> None:
    """No --config / --workdir: this command reads and writes folders only (so not cli.run)."""
    if any(arg in ("-h", "--help", "-?") for arg in sys.argv[1:]):
        print(f"{NAME} --hf=DIR --out=DIR | --export --ckpt=DIR --out=DIR\n\n{__doc__.strip()}\n")
        print(FLAGS.module_help(__name__))
        sys.exit(0)
    logging.set_verbosity(logging.WARNING)  # Orbax's per-save chatter
    app.run(main)


if __name__ == "__main__":
    run()
