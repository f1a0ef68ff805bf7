"""Greedy decode tokens/s: our KV-cache decoder (inference/decoding.py) vs `transformers` generate.

    python benchmarks/peers/decode_vs_transformers.py [--batch=1] [--prompt_len=32] [--new_tokens=64]
        [--repeats=3] [--chunk=16] [--json=benchmarks/results/decode_vs_transformers.json]

One small random LlamaForCausalLM (Llama-3.1 RoPE scaling, GQA), built by `transformers`,
saved and imported with interop/hf.py, so both sides run the same weights; both decode
greedily with a KV cache and the same prompts, fp32 on this CPU. They run alternately in
one process (`repeats` rounds each, compiled / warmed up first), so load from other
processes hits them alike; figures are medians over rounds. A third side runs transformers'
model in a bare loop with its cache, to tell generate's own per-token overhead from the
model's. Needs the `peers` extra.

torch threads: on a loaded 2-core machine torch's default of 2 OpenMP threads makes each
decode step ~15x slower than 1 thread (threads wait on each other at every small matmul),
so the default here is 1, torch's best case on such a machine; --torch_threads=0 runs its default.
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from m2omni_jax.inference import decoding
from m2omni_jax.interop import hf
from m2omni_jax.models.llm import LLM

flags.DEFINE_integer("batch", 1, "Prompts decoded together.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt (no early stop).")
flags.DEFINE_integer("repeats", 3, "Alternating rounds per side.")
flags.DEFINE_integer("chunk", 16, "Our decode steps per device call (inference/decoding.py; 1: one per token).")
flags.DEFINE_integer("torch_threads", 1, "torch intra-op threads (0: torch's default, one per core).")
flags.DEFINE_string("json", os.path.join(os.path.dirname(__file__), "..", "results", "decode_vs_transformers.json"),
                    "Write the results here ('' to skip).")
FLAGS = flags.FLAGS

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500_000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64})


def main(argv):
    del argv
    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(json.dumps(MODEL)))).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        imported = hf.load_hf(folder)
    prompts = np.random.default_rng(0).integers(0, MODEL["vocab_size"], (FLAGS.batch, FLAGS.prompt_len))
    new = FLAGS.new_tokens

    decode = decoding.make_greedy_decoder(LLM(imported.llm), max_len=FLAGS.prompt_len + new, chunk=FLAGS.chunk)
    positions = np.broadcast_to(np.arange(FLAGS.prompt_len), prompts.shape)
    inputs = {"tokens": jnp.asarray(prompts), "positions": jnp.asarray(np.stack([positions] * 3)),
              "segment_ids": jnp.ones(prompts.shape, jnp.int32)}
    next_position = np.full(FLAGS.batch, FLAGS.prompt_len)
    params = jax.device_put(imported.params)

    def ours():
        return decode(params, inputs, next_position, new)

    def theirs():
        with torch.inference_mode():
            out = model.generate(torch.tensor(prompts), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        return out[:, FLAGS.prompt_len:].numpy()

    def their_forward_loop():
        """transformers' model with its KV cache in a bare loop: generate's overhead left out."""
        with torch.inference_mode():
            out = model(torch.tensor(prompts), use_cache=True)
            token, tokens = out.logits[:, -1].argmax(-1, keepdim=True), []
            for _ in range(new - 1):
                tokens.append(token)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            return torch.cat(tokens + [token], 1).numpy()

    reference = ours()  # also the warm-up: compiles ours
    same = bool(np.array_equal(reference, theirs()) and np.array_equal(reference, their_forward_loop()))
    sides = (("ours", ours), ("transformers", theirs), ("transformers_forward_loop", their_forward_loop))
    times = {name: [] for name, _ in sides}
    for _ in range(FLAGS.repeats):
        for name, fn in sides:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = FLAGS.batch * new
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    result = {
        "what": "greedy decode tokens/s (prefill included), KV cache, fp32, same random Llama weights",
        "model": {k: v for k, v in MODEL.items()}, "batch": FLAGS.batch, "prompt_len": FLAGS.prompt_len,
        "new_tokens": new, "repeats": FLAGS.repeats, "chunk": FLAGS.chunk, "same_tokens": same,
        "tokens_per_s": rate, "ratio_ours_over_transformers": rate["ours"] / rate["transformers"],
        "ratio_ours_over_transformers_forward_loop": rate["ours"] / rate["transformers_forward_loop"],
        "seconds": times, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "platform": platform.platform(),
    }
    print(f"ours {rate['ours']:.1f} tok/s | transformers generate {rate['transformers']:.1f} tok/s | ratio "
          f"{result['ratio_ours_over_transformers']:.2f} | transformers forward loop "
          f"{rate['transformers_forward_loop']:.1f} tok/s (ratio "
          f"{result['ratio_ours_over_transformers_forward_loop']:.2f}) | same greedy tokens: {same}")
    if FLAGS.json:
        os.makedirs(os.path.dirname(FLAGS.json), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
