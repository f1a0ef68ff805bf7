"""Training tokens/s: our train step vs the same model and optimizer in PyTorch, side by side.

    python benchmarks/peers/train_vs_torch.py [--config=configs/bench_32m.py] [--steps=5] [--repeats=2]
        [--json=benchmarks/results/peers_train_bench_32m_cpu.json]

Ours: benchmarks/train_throughput.py's step (the jitted, sharded, donated train step and
optax chain of `m2omni-train`). The peer: `transformers`' LlamaForCausalLM built from our
LLM's config (interop/hf.py: same sizes, RoPE, GQA, untied/tied head) with our initial
weights, trained with `torch.optim.AdamW` (fused), the same hyper-parameters, LR schedule,
no-decay set (norm scales), global-norm clipping and mean cross-entropy, on the same token
batch, fp32. Both sides time `--steps` steps after 2 warm-up steps; their final losses
agree when both train the same model (printed). Each round runs ours then the peer, each
in its own subprocess (thread pools never overlap), `--repeats` rounds; the figures are
medians over rounds. Both use every core: XLA's default, and torch.set_num_threads(cpu_count).
Needs the `peers` extra (torch CPU, transformers).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks import train_throughput  # noqa: E402  (defines --config, --steps, --json)

flags.DEFINE_integer("repeats", 2, "Alternating rounds (ours, then the peer) in separate subprocesses.")
flags.DEFINE_enum("side", "", ["", "ours", "torch"], "Internal: run one side in this process.")
flags.DEFINE_string("workdir", "", "Internal: the shared initial weights, batch and LR schedule.")
flags.adopt_module_key_flags(train_throughput)  # --help lists --config, --steps, --json too
FLAGS = flags.FLAGS
FLAGS.set_default("steps", 5)
FLAGS.set_default("json", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                       "peers_train_bench_32m_cpu.json"))
WARMUP_STEPS = 2


def prepare(config, folder: str) -> dict:
    """Writes our initial weights as an HF folder, the token batch and the LR of every step."""
    import jax
    from m2omni_jax.interop import hf
    from m2omni_jax.training import optimizers
    llm_config, shape, state, _, batch, _ = train_throughput.build(config)
    hf.export_hf(jax.device_get(state.params), llm_config, folder)
    np.savez(os.path.join(folder, "batch.npz"), tokens=np.asarray(batch["tokens"]),
             targets=np.asarray(batch["targets"]))
    schedule = optimizers.make_schedule_from_config(config.opt, train_throughput.SCHEDULE_STEPS)
    meta = {"lrs": [float(schedule(t)) for t in range(WARMUP_STEPS + FLAGS.steps)],
            "params": llm_config.num_params(), "batch": list(shape)}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def run_ours(config) -> dict:
    result = train_throughput.benchmark(config, FLAGS.steps)
    return {"tokens_per_s": result["tokens_per_s"], "step_time_s": result["step_time_s"],
            "final_loss": result["final_loss"], "params": result["params"],
            "threads": f"XLA:CPU default (all {os.cpu_count()} cores)"}


def run_torch(config, folder: str) -> dict:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    opt = config.opt
    with open(os.path.join(folder, "meta.json")) as f:
        lrs = json.load(f)["lrs"]
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith("norm.weight")]  # ours: opt.no_decay (norm scales)
    decay = [p for n, p in named if not n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lrs[0], betas=(opt.b1, opt.b2), eps=opt.eps, fused=True)
    data = np.load(os.path.join(folder, "batch.npz"))
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    targets = torch.from_numpy(data["targets"].astype(np.int64))

    def step(t):
        for group in optimizer.param_groups:
            group["lr"] = lrs[t]
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        return loss.item()

    for t in range(WARMUP_STEPS):
        step(t)
    times = []
    for t in range(WARMUP_STEPS, WARMUP_STEPS + FLAGS.steps):
        start = time.perf_counter()
        loss = step(t)
        times.append(time.perf_counter() - start)
    step_time = float(np.median(times))
    return {"tokens_per_s": tokens.numel() / step_time, "step_time_s": step_time, "final_loss": loss,
            "params": sum(p.numel() for p in model.parameters()),
            "threads": f"torch.set_num_threads({torch.get_num_threads()})", "torch": torch.__version__,
            "transformers": transformers.__version__}


def run_side(side: str, folder: str, config_args: list[str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--workdir={folder}",
               f"--steps={FLAGS.steps}", *config_args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{side} side failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(argv) -> dict:
    config_args = [a for a in argv[1:] if a.startswith("--config")]
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        meta = prepare(FLAGS.config, folder)
        for r in range(FLAGS.repeats):
            for side in ("ours", "torch"):
                load = os.getloadavg()[0]
                result = dict(run_side(side, folder, config_args), side=side, round=r, load_1min=load)
                rounds.append(result)
                print(f"round {r} {side:5s}: {result['tokens_per_s']:6.0f} tokens/s, step "
                      f"{result['step_time_s']:.2f} s, final loss {result['final_loss']:.4f}, "
                      f"{result['threads']}, 1-min load {load:.2f}", flush=True)
    figures = {s: statistics.median(r["tokens_per_s"] for r in rounds if r["side"] == s) for s in ("ours", "torch")}
    params = {s: rounds[i]["params"] for i, s in enumerate(("ours", "torch"))}
    if len(set(params.values())) != 1 or params["ours"] != meta["params"]:
        raise RuntimeError(f"the two models differ in size: {params} (LLMConfig says {meta['params']})")
    return {"config": train_throughput.config_flags.get_config_filename(FLAGS["config"]),
            "batch": meta["batch"], "params": params["ours"], "steps": FLAGS.steps, "repeats": FLAGS.repeats,
            "cpu_count": os.cpu_count(), "ours_tokens_per_s": figures["ours"],
            "torch_tokens_per_s": figures["torch"], "ratio_ours_over_torch": figures["ours"] / figures["torch"],
            "round_ratios": [rounds[i]["tokens_per_s"] / rounds[i + 1]["tokens_per_s"]
                             for i in range(0, len(rounds), 2)],
            "rounds": rounds}


def main(argv):
    if FLAGS.side:
        result = run_ours(FLAGS.config) if FLAGS.side == "ours" else run_torch(FLAGS.config, FLAGS.workdir)
        print(json.dumps(result))
        return
    results = compare(argv)
    print(f"{results['params'] / 1e6:.2f}M params both, batch {results['batch']}, fp32, all "
          f"{results['cpu_count']} cores each: ours {results['ours_tokens_per_s']:.0f} tokens/s, PyTorch "
          f"{results['torch_tokens_per_s']:.0f} tokens/s (medians of {results['repeats']}), "
          f"ours/PyTorch {results['ratio_ours_over_torch']:.2f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
