"""An HF folder to a checkpoint our runs start from (`config.init_from`), and back.

`import_folder` writes `<out>/checkpoints/0/` (Orbax, the layout `checkpointing.load_params`
reads), `<out>/model_config.json` (the config fields the parameters fit: model.kind,
model.llm, model.vision, tokenizer) and, when the folder has one, `<out>/tokenizer.json`
with our special tokens added. `export_checkpoint` reads a workdir's latest checkpoint (an
LLM, or the LLM tower of an omni run) and writes an HF folder.
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from m2omni_jax import faults, workdir as workdir_lib
from m2omni_jax.config_fields import ConfigError
from m2omni_jax.interop import hf, hf_tokenizer
from m2omni_jax.models.llm import LLM, LLMConfig
from m2omni_jax.training import checkpointing

MODEL_CONFIG = "model_config.json"
LAYOUTS = ("auto", "llm", "omni")  # the param tree: the LLM's own, or OmniModel's {"llm": ..., "vision": ...}


def import_folder(folder: str, out: str, *, layout: str = "auto", param_dtype: str = "float32",
                  scan_layers: bool = True) -> dict:
    """Converts an HF folder into `out` (see the module docstring); returns the written config.

    layout "auto": the LLM's tree for a text model, OmniModel's for Qwen2-VL; "omni" puts
    a text model's LLM under "llm" too, for an omni run's init_from.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout={layout!r}; use one of {LAYOUTS}")
    out = workdir_lib.local_or_url(out)  # the checkpoint folder: local or a bucket (the HF folder: local)
    root = epath.Path(out) / "checkpoints"
    if root.is_dir() and any(p.name.isdigit() for p in root.iterdir()):
        raise faults.RunError(f"{root} holds checkpoints already; import into a new directory")
    imported = hf.load_hf(folder, scan_layers=scan_layers, param_dtype=param_dtype)
    llm_params = imported.params if imported.vision is None else imported.params["llm"]
    llm = imported.llm
    tokenizer = None
    if os.path.exists(os.path.join(folder, hf_tokenizer.TOKENIZER_FILE)):
        tokenizer = hf_tokenizer.HFTokenizer(folder)
        if tokenizer.vocab_size > llm.vocab_size:
            size = -(-tokenizer.vocab_size // 128) * 128  # a round size shards evenly
            logging.warning("embedding grown from %d to %d rows for the tokenizer's added special tokens",
                         llm.vocab_size, size)
            llm_params, llm = hf.resize_vocab(llm_params, llm, size)
    kind = imported.kind if layout == "auto" else layout
    params = llm_params if kind == "llm" else {"llm": llm_params}
    if imported.vision is not None and kind == "omni":
        params["vision"] = imported.params["vision"]

    epath.Path(out).mkdir(parents=True, exist_ok=True)
    model = {"kind": kind, "llm": _fields(llm)}
    if imported.vision is not None and kind == "omni":
        model["vision"] = _fields(imported.vision)
    written = {"model": model, "init_from": out,
               "source": {"hf": os.path.abspath(folder), "architecture": imported.architecture}}
    if tokenizer is not None:
        tokenizer.save(out)
        written["tokenizer"] = {"path": os.fspath(epath.Path(out) / hf_tokenizer.TOKENIZER_FILE),
                                "vocab_size": tokenizer.vocab_size}
        written["source"]["token_ids"] = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    with checkpointing.Checkpointer(os.fspath(root), save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(0, {"params": jax.tree.map(jnp.asarray, params)}, force=True)
    (epath.Path(out) / MODEL_CONFIG).write_text(json.dumps(written, indent=2))
    return written


def _fields(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def read_llm_config(path: str) -> LLMConfig:
    """The LLMConfig of a JSON file: `import_folder`'s model_config.json ({"model": {"llm": ...}})
    or the model.llm fields alone."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist (the LLM config as JSON: model_config.json of "
                                "m2omni-import, or a dict of model.llm fields)")
    data = json.loads(epath.Path(path).read_text())
    fields = data.get("model", {}).get("llm", data)
    return LLMConfig.from_config({**fields, "mrope_sections": tuple(fields.get("mrope_sections", (16, 24, 24)))})


def load_llm_params(workdir: str, cfg: LLMConfig) -> dict:
    """The LLM's parameters in a workdir's latest checkpoint: an LLM run's tree, or the
    "llm" subtree of an omni run's."""
    model = LLM(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.unbox(boxed))
    total = len(jax.tree.leaves(abstract))
    for nested in (False, True):
        tree = {"llm": abstract} if nested else abstract
        loaded, missing = checkpointing.load_params(workdir, tree)
        if not missing:
            return loaded["llm"] if nested else loaded
        if len(missing) < total:
            raise faults.RunError(f"the checkpoint in {workdir} lacks {len(missing)} of the LLM's {total} tensors "
                                  f"(or holds them with other shapes): {missing[:3]}; is it this LLM config's?")
    raise faults.RunError(f"no tensor of the checkpoint in {workdir} fits the LLM config (model.llm)")


def export_checkpoint(workdir: str, out: str, *, llm_config: str | None = None, dtype: str = "float32") -> list[str]:
    """Writes the LLM of `workdir`'s latest checkpoint as an HF folder `out`; the LLM config
    is read from `llm_config` (default `<workdir>/model_config.json`). A tokenizer.json in
    the workdir (m2omni-import writes one) is written along."""
    cfg = read_llm_config(llm_config or os.fspath(epath.Path(workdir) / MODEL_CONFIG))
    params = jax.tree.map(np.asarray, load_llm_params(workdir, cfg))
    ids = {}
    if (epath.Path(workdir) / hf_tokenizer.TOKENIZER_FILE).exists():
        tokenizer = hf_tokenizer.HFTokenizer(workdir)
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    files = hf.export_hf(params, cfg, out, dtype=dtype, **ids)
    if ids:
        files += tokenizer.save(out)
    return files
