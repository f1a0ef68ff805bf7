"""Hugging Face checkpoints in and out, with logit parity.

    imported = hf.load_hf("/models/Llama-3.1-8B")     # config.json + *.safetensors (or shards + index)
    imported.llm, imported.vision, imported.params       # LLMConfig, VisionConfig | None, our param tree
    hf.export_hf(params, llm_config, "/tmp/llama_out")   # a folder `transformers` loads

Read: `LlamaForCausalLM` (RoPE scaling "llama3" included), `Qwen2ForCausalLM` (q/k/v
biases) and `Qwen2VLForConditionalGeneration` (its language model with its M-RoPE
sections, and its ViT + PatchMerger under `visual.`). Written: our LLM as an
`LlamaForCausalLM` (`Qwen2ForCausalLM` when it has q/k/v biases).

Layouts: an HF Linear weight is (out, in), our kernels (in, out), with attention split
into (heads, head_dim). HF's Llama/Qwen2 rotate q/k "rotate-half" (pair i = x[i],
x[i + D/2]) as `rope.apply_rotary` does, so no permutation is needed. A scanned stack
(`scan_layers`) holds one array per parameter, the layer on axis 0. A Llama or Qwen2 LLM
gets M-RoPE sections in Qwen2-VL's 1 : 1.5 : 1.5 proportions (16, 24, 24 at head_dim 128):
on text (t = h = w) that is exactly the 1-D RoPE it was trained with.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from m2omni_jax.config_fields import ConfigError
from m2omni_jax.interop import safetensors_io
from m2omni_jax.models import layers
from m2omni_jax.models.llm import LLMConfig
from m2omni_jax.models.vision import VisionConfig

LLAMA, QWEN2, QWEN2_VL = "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen2VLForConditionalGeneration"
ARCHITECTURES = (LLAMA, QWEN2, QWEN2_VL)
_MODEL_TYPES = {"llama": LLAMA, "qwen2": QWEN2, "qwen2_vl": QWEN2_VL}
_DEFAULT_ROPE_THETA = {LLAMA: 10_000.0, QWEN2: 10_000.0, QWEN2_VL: 1_000_000.0}
# Where a folder keeps each tower (older and newer `transformers` save different names).
_LLM_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_HEAD_PREFIXES = ("", "language_model.")
_VISION_PREFIXES = ("visual.", "model.visual.")
# Qwen2VLVisionConfig's defaults, for fields a config.json leaves out.
_VISION_DEFAULTS = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4,
                        num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)


@dataclasses.dataclass(frozen=True)
class Imported:
    """A Hugging Face checkpoint in our terms."""
    architecture: str
    llm: LLMConfig
    vision: VisionConfig | None  # Qwen2-VL's ViT, or None
    params: dict  # the LLM's tree, or {"llm": ..., "vision": ...} (as in OmniModel) with a vision tower

    @property
    def kind(self) -> str:
        """config.model.kind of a run these parameters fit."""
        return "llm" if self.vision is None else "omni"


# --------------------------------------------------------------------------- configs

def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no config.json (not a Hugging Face model folder?)")
    with open(path) as f:
        return json.load(f)


def architecture(hf: Mapping) -> str:
    """The one supported architecture config.json names, or a `ConfigError` naming what it names."""
    names = list(hf.get("architectures") or [])
    found = [a for a in names if a in ARCHITECTURES]
    if found:
        return found[0]
    if not names and hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    raise ConfigError(f"config.json: architectures={names} (model_type={hf.get('model_type')!r}) is not "
                      f"supported; we read {list(ARCHITECTURES)}")


def _text_fields(hf: Mapping, arch: str) -> dict:
    """The language model's config fields (Qwen2-VL nests them under text_config, or not)."""
    return {**hf, **hf.get("text_config", {})} if arch == QWEN2_VL else dict(hf)


def _rope_fields(text: Mapping, arch: str) -> tuple[float, str, dict]:
    """(theta, scaling kind, parameters) from `rope_parameters` (transformers >= 5) or
    `rope_theta` + `rope_scaling` (older)."""
    params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", text.get("rope_theta", _DEFAULT_ROPE_THETA[arch])))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, "default" if kind == "mrope" else kind, params


def default_mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) frequency pairs in Qwen2-VL's 1 : 1.5 : 1.5 proportions; (16, 24, 24) at 128."""
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return t, h, pairs - t - h


def _unsupported(field: str, value, what: str) -> ConfigError:
    return ConfigError(f"config.json: {field}={value!r} is not supported ({what})")


def llm_config_from_hf(hf: Mapping, **overrides) -> LLMConfig:
    """Our `LLMConfig` of an HF config.json; `overrides`: our fields to set as well
    (scan_layers, dtype, param_dtype, remat_policy, ...)."""
    arch = architecture(hf)
    text = _text_fields(hf, arch)
    if text.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", text["hidden_act"], "our MLP is SwiGLU")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if text.get(flag):
            raise _unsupported(flag, text[flag], "ours has no output/MLP biases and attends to the whole context")
    theta, kind, rope = _rope_fields(text, arch)
    if kind not in ("default", "llama3"):
        raise _unsupported("rope_scaling.rope_type", kind, "we read 'default' and 'llama3'")
    if rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported("partial_rotary_factor", text.get("partial_rotary_factor"), "we rotate whole heads")
    num_heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or text["hidden_size"] // num_heads)
    fields = dict(
        vocab_size=int(text["vocab_size"]), width=int(text["hidden_size"]), depth=int(text["num_hidden_layers"]),
        num_heads=num_heads, num_kv_heads=int(text.get("num_key_value_heads") or num_heads), head_dim=head_dim,
        mlp_dim=int(text["intermediate_size"]), rope_theta=theta,
        mrope_sections=tuple(int(s) for s in rope.get("mrope_section", default_mrope_sections(head_dim))),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)), qkv_bias=arch != LLAMA,
        tie_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))
    if kind == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_len=int(rope["original_max_position_embeddings"]))
    return LLMConfig(**{**fields, **overrides})


def vision_config_from_hf(hf: Mapping, **overrides) -> VisionConfig:
    """Our `VisionConfig` of a Qwen2-VL config.json's `vision_config`."""
    if architecture(hf) != QWEN2_VL:
        raise ConfigError(f"config.json: architectures={hf.get('architectures')} has no vision tower we read "
                          f"(only {QWEN2_VL})")
    v = {**_VISION_DEFAULTS, **hf.get("vision_config", {})}
    if v["hidden_act"] != "quick_gelu":
        raise _unsupported("vision_config.hidden_act", v["hidden_act"], "the Qwen2-VL ViT's MLP is quick_gelu")
    fields = dict(width=int(v["embed_dim"]), depth=int(v["depth"]), num_heads=int(v["num_heads"]),
                  mlp_ratio=float(v["mlp_ratio"]), out_width=int(v["hidden_size"]),
                  patch_size=int(v["patch_size"]), temporal_patch_size=int(v["temporal_patch_size"]),
                  spatial_merge_size=int(v["spatial_merge_size"]), in_channels=int(v["in_channels"]),
                  rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10_000.0)),
                  layer_norm_epsilon=1e-6)
    return VisionConfig(**{**fields, **overrides})


def hf_config_from_llm(cfg: LLMConfig, *, dtype: str = "float32", bos_token_id: int | None = None,
                       eos_token_id: int | None = None, max_position_embeddings: int | None = None) -> dict:
    """config.json of our LLM as an LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases).
    RoPE is written both ways (`rope_theta` + `rope_scaling`, and `rope_parameters`), so
    `transformers` 4 and 5 read it alike."""
    if cfg.moe_num_experts:
        raise ConfigError(f"model.llm.moe_num_experts={cfg.moe_num_experts}: a mixture-of-experts LLM has no "
                          "Llama/Qwen2 counterpart to export to")
    arch, model_type = (QWEN2, "qwen2") if cfg.qkv_bias else (LLAMA, "llama")
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    if max_position_embeddings is None:
        max_position_embeddings = (int(cfg.rope_original_max_len * cfg.rope_scaling_factor) if scaling else 8192)
    config = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": max_position_embeddings, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype, "dtype": dtype,
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    return config


# --------------------------------------------------------------------------- weights

def _find_prefix(tensors: Mapping, prefixes, probe: str, what: str) -> str:
    for prefix in prefixes:
        if prefix + probe in tensors:
            return prefix
    raise ConfigError(f"the checkpoint has no {what} tensors (looked for {[p + probe for p in prefixes]})")


class _Reader:
    """Tensors by name, cast to `dtype`, remembering which were read (to name the rest)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], dtype, folder: str):
        self.tensors, self.dtype, self.folder, self.used = tensors, np.dtype(dtype), folder, set()

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConfigError(f"{self.folder}: tensor {name} is missing (the config.json says it should be there)")
        self.used.add(name)
        return np.asarray(self.tensors[name]).astype(self.dtype)

    def linear(self, name: str) -> np.ndarray:
        """An HF Linear's (out, in) weight as our (in, out) kernel."""
        return self(name + ".weight").T


def _stack(per_layer: list[dict], scanned: bool, scanned_name: str, unrolled_prefix: str) -> dict:
    """{scanned_name: one tree with the layer on axis 0} (nn.scan), or {unrolled_prefix + i: tree}."""
    if scanned:
        flat = [traverse_util.flatten_dict(t) for t in per_layer]
        return {scanned_name: traverse_util.unflatten_dict({k: np.stack([f[k] for f in flat]) for k in flat[0]})}
    return {f"{unrolled_prefix}{i}": t for i, t in enumerate(per_layer)}


def llm_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: LLMConfig, *, folder: str = "the checkpoint",
                       reader: _Reader | None = None) -> dict:
    """Our LLM's parameter tree (numpy, cfg.param_dtype) from HF Llama/Qwen2 tensors."""
    if cfg.moe_num_experts:
        raise ConfigError("model.llm.moe_num_experts > 0: HF Llama/Qwen2 checkpoints are dense")
    read = reader or _Reader(tensors, layers.to_dtype(cfg.param_dtype), folder)
    p = _find_prefix(tensors, _LLM_PREFIXES, "embed_tokens.weight", "language model")
    e, h, k, d = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def layer(i):
        a = f"{p}layers.{i}.self_attn."
        attention = {"query": {"kernel": read.linear(a + "q_proj").reshape(e, h, d)},
                     "key": {"kernel": read.linear(a + "k_proj").reshape(e, k, d)},
                     "value": {"kernel": read.linear(a + "v_proj").reshape(e, k, d)},
                     "out": {"kernel": read.linear(a + "o_proj").reshape(h, d, e)}}
        if cfg.qkv_bias:
            for ours, theirs, heads in (("query", "q_proj", h), ("key", "k_proj", k), ("value", "v_proj", k)):
                attention[ours]["bias"] = read(f"{a}{theirs}.bias").reshape(heads, d)
        m = f"{p}layers.{i}.mlp."
        return {"attention": attention,
                "attention_norm": {"scale": read(f"{p}layers.{i}.input_layernorm.weight")},
                "mlp_norm": {"scale": read(f"{p}layers.{i}.post_attention_layernorm.weight")},
                "mlp": {name: {"kernel": read.linear(m + f"{name}_proj")} for name in ("gate", "up", "down")}}

    params = {"embedding": read(p + "embed_tokens.weight"),
              "decoder": _stack([layer(i) for i in range(cfg.depth)], cfg.scan_layers, "layers", "layers_"),
              "final_norm": {"scale": read(p + "norm.weight")}}
    head = next((q + "lm_head.weight" for q in _HEAD_PREFIXES if q + "lm_head.weight" in tensors), None)
    if cfg.tie_embeddings:
        if head is not None:
            read.used.add(head)  # some tied checkpoints store the copy as well
    elif head is None:
        raise ConfigError(f"{folder}: tensor lm_head.weight is missing and config.json has tie_word_embeddings "
                          "false")
    else:
        params["lm_head"] = {"kernel": read(head).T}
    return params


def vision_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: VisionConfig, *,
                          folder: str = "the checkpoint", reader: _Reader | None = None) -> dict:
    """Our VisionEncoder's parameter tree from the Qwen2-VL ViT + merger tensors (`visual.*`)."""
    read = reader or _Reader(tensors, layers.to_dtype(cfg.param_dtype), folder)
    p = _find_prefix(tensors, _VISION_PREFIXES, "patch_embed.proj.weight", "vision tower")
    e, h, d = cfg.width, cfg.num_heads, cfg.head_dim

    def norm(name):
        return {"LayerNorm_0": {"scale": read(name + ".weight"), "bias": read(name + ".bias")}}

    def dense(name):
        return {"kernel": read.linear(name), "bias": read(name + ".bias")}

    def block(i):
        b = f"{p}blocks.{i}."
        qkv = read.linear(b + "attn.qkv").reshape(e, 3, h, d)  # outputs are (q|k|v, head, dim)
        qkv_bias = read(b + "attn.qkv.bias").reshape(3, h, d)
        attention = {name: {"kernel": qkv[:, j], "bias": qkv_bias[j]}
                     for j, name in enumerate(("query", "key", "value"))}
        attention["out"] = {"kernel": read.linear(b + "attn.proj").reshape(h, d, e), "bias": read(b + "attn.proj.bias")}
        return {"attention_norm": norm(b + "norm1"), "mlp_norm": norm(b + "norm2"), "attention": attention,
                "mlp": {"fc1": dense(b + "mlp.fc1"), "fc2": dense(b + "mlp.fc2")}}

    # The Conv3d kernel (out, C, T, P, P) over a patch flattened (C, T, P, P) is a Linear.
    patch = read(p + "patch_embed.proj.weight")
    params = {"patch_embed": {"kernel": patch.reshape(patch.shape[0], -1).T},
              "merger": {"norm": norm(p + "merger.ln_q"), "fc1": dense(p + "merger.mlp.0"),
                         "fc2": dense(p + "merger.mlp.2")}}
    params.update(_stack([block(i) for i in range(cfg.depth)], cfg.scan, "blocks", "block_"))
    return params


def hf_tensors_from_llm(params: Mapping, cfg: LLMConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """HF Llama/Qwen2 tensors ({name: (out, in) weight}) of our LLM's parameter tree."""
    cast = lambda x: np.asarray(x).astype(layers.to_dtype(dtype))  # noqa: E731
    decoder = params["decoder"]
    if "layers" in decoder:
        layer_trees = [{k: v[i] for k, v in traverse_util.flatten_dict(decoder["layers"]).items()}
                       for i in range(cfg.depth)]
    else:
        layer_trees = [traverse_util.flatten_dict(decoder[f"layers_{i}"]) for i in range(cfg.depth)]
    e = cfg.width
    out = {"model.embed_tokens.weight": cast(params["embedding"])}
    for i, t in enumerate(layer_trees):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{a}{theirs}.weight"] = cast(np.asarray(t[("attention", ours, "kernel")]).reshape(e, -1).T)
            if cfg.qkv_bias:
                out[f"{a}{theirs}.bias"] = cast(np.asarray(t[("attention", ours, "bias")]).reshape(-1))
        out[a + "o_proj.weight"] = cast(np.asarray(t[("attention", "out", "kernel")]).reshape(-1, e).T)
        for name in ("gate", "up", "down"):
            out[f"{m}{name}_proj.weight"] = cast(np.asarray(t[("mlp", name, "kernel")]).T)
        out[f"model.layers.{i}.input_layernorm.weight"] = cast(t[("attention_norm", "scale")])
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = cast(t[("mlp_norm", "scale")])
    out["model.norm.weight"] = cast(params["final_norm"]["scale"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = cast(np.asarray(params["lm_head"]["kernel"]).T)
    return out


# --------------------------------------------------------------------------- folders

def load_hf(folder: str, *, scan_layers: bool = True, param_dtype: str = "float32",
            llm_overrides: Mapping[str, Any] | None = None,
            vision_overrides: Mapping[str, Any] | None = None) -> Imported:
    """Reads an HF folder (config.json + safetensors) into our configs and parameter tree.

    Every tensor of the checkpoint must be mapped (rotary buffers aside): one we would
    drop is an error naming it, since a dropped weight breaks parity silently.
    """
    hf = read_config(folder)
    arch = architecture(hf)
    tensors = safetensors_io.TensorFolder(folder)
    llm = llm_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype, **dict(llm_overrides or {}))
    read = _Reader(tensors, layers.to_dtype(param_dtype), folder)
    params = llm_params_from_hf(tensors, llm, folder=folder, reader=read)
    vision = None
    if arch == QWEN2_VL:
        vision = vision_config_from_hf(hf, scan=scan_layers, param_dtype=param_dtype, **dict(vision_overrides or {}))
        params = {"llm": params, "vision": vision_params_from_hf(tensors, vision, folder=folder, reader=read)}
    left = sorted(n for n in tensors if n not in read.used and not n.endswith("rotary_emb.inv_freq"))
    if left:
        raise ConfigError(f"{folder}: {len(left)} tensors have no place in our {arch} model: {left[:5]}"
                          f"{' ...' if len(left) > 5 else ''}")
    return Imported(arch, llm, vision, params)


def export_hf(params: Mapping, cfg: LLMConfig, folder: str, *, dtype: str = "float32",
              max_shard_bytes: int = 5 << 30, **config_fields) -> list[str]:
    """Writes our LLM as an HF folder (config.json + safetensors) that `transformers`
    loads with `AutoModelForCausalLM.from_pretrained`; returns the files written.
    `config_fields`: `hf_config_from_llm`'s keywords (bos/eos token ids, ...)."""
    config = hf_config_from_llm(cfg, dtype=dtype, **config_fields)
    files = safetensors_io.write_folder(folder, hf_tensors_from_llm(params, cfg, dtype), max_shard_bytes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return files + ["config.json"]


def resize_vocab(params: dict, cfg: LLMConfig, vocab_size: int) -> tuple[dict, LLMConfig]:
    """Grows the embedding (and LM head) to `vocab_size` rows for tokens a tokenizer added;
    new rows are the mean of the old ones (a new token starts as an average token)."""
    if vocab_size <= cfg.vocab_size:
        return params, cfg
    grow = lambda w, axis: np.concatenate(  # noqa: E731
        [w, np.repeat(w.mean(axis, keepdims=True), vocab_size - cfg.vocab_size, axis)], axis).astype(w.dtype)
    params = dict(params, embedding=grow(params["embedding"], 0))
    if "lm_head" in params:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"], 1)}
    return params, dataclasses.replace(cfg, vocab_size=vocab_size)
