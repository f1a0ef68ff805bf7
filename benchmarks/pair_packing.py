"""PT1 pair packing: pairs trained per second, image–text pairs joined into one sequence vs separate segments.

    python benchmarks/pair_packing.py [--rounds=3] [--steps=4] [--batches=12] [--json=PATH]

Result (2-core CPU, load ~20): 4.27 pairs per 256-token row either way (non-pad 95.8%), 13.3 vs
13.1 pairs/s (1.02×: noise, the rows are the same); one pair per row would fill 22.4% (1 pair/row).

The PT1 stage at tiny size (configs/stages/pt1.py:tiny: image–caption and OCR pairs 0.7, ASR
pairs 0.3, LLM frozen) on the built-in shapes world, written to a temporary directory. Two
settings, the same but for `data.pack_pairs`: ("image",) — a row's image–text pairs joined into
one sequence (one segment, attending to each other) — and () — each pair its own segment.
Joining happens after first-fit packing (`pipeline.JoinRowPairs`), so both hold the same pairs
per row, and the train step has the same shapes (one compilation): what is measured is that
joining costs nothing. Per setting: pairs per row, non-pad token fraction, patch fill, the
pipeline's batches/s and the train step's time; the settings alternate over `--rounds` (other
jobs share the host) and the medians are reported. Pairs/s = pairs per batch / step time. The
gain packing gives (the paper's 1.5×) is against one pair per row: its non-pad fraction is mean
pair tokens / seq_len, its pairs/s batch / step time.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import m2omni_jax.experiments  # noqa: E402,F401  (the built-in data set's sources)
from configs.stages import pt1  # noqa: E402
from m2omni_jax import build  # noqa: E402
from m2omni_jax.config_fields import replace  # noqa: E402
from m2omni_jax.data import media, pipeline, sources, tokenizer as tokenizer_lib  # noqa: E402
from m2omni_jax.modalities import NUM_MODALITIES, modality_id  # noqa: E402
from m2omni_jax.parallel import sharding  # noqa: E402
from m2omni_jax.run_config import RunConfig  # noqa: E402
from m2omni_jax.training import optimizers, train_step  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
SETTINGS = {"joined": ("image",), "segments": ()}


def pt1_config(root: str, num_train: int) -> RunConfig:
    config = pt1.get_config("tiny")
    config.data.dir = os.path.join(root, "data")
    config.tokenizer.cache_dir = os.path.join(root, "tokenizer")
    config.data.sources.shapes_world.update(dict(num_train=num_train, num_eval=50))
    config.data.sources.shapes_world.speech.update(dict(num_train=max(num_train // 4, 20), num_eval=8))
    config.data.audio.cmvn_samples = 20
    return RunConfig.of(config)


def row_counts(batch: dict, bos_id: int) -> dict[str, float]:
    """Pairs (every sample opens with bos) and image pairs per row; fills."""
    real = batch["segment_ids"] > 0
    bos = (batch["tokens"] == bos_id) & real
    rows = len(batch["tokens"])
    return {"pairs_per_row": float(bos.sum()) / rows,
            "image_pairs_per_row": float((bos & (batch["modality"] == modality_id("image"))).sum()) / rows,
            "segments_per_row": float(np.sum(np.max(batch["segment_ids"], axis=-1))) / rows,
            "token_fill": float(real.mean()), "patch_fill": float(np.mean(batch["vision_segment_ids"] > 0)),
            "pair_tokens": float(real.sum()) / max(float(bos.sum()), 1.0)}


def read_batches(config, tokenizer, num: int) -> tuple[list[dict], float]:
    """`num` batches after one warm-up batch, and the pipeline's batches/s."""
    iterator = build.make_train_iterator(config, tokenizer)
    next(iterator)
    start = time.perf_counter()
    batches = [next(iterator) for _ in range(num)]
    return batches, num / (time.perf_counter() - start)


def make_step(config, tokenizer):
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.sharding_rules) or sharding.LOGICAL_AXIS_RULES
    model, tx, shapes = build.make_model_and_optimizer(config, tokenizer)
    state, abstract, shardings = train_step.create_train_state(model, tx, mesh, rules, shapes, config.seed)
    frozen = optimizers.frozen_mask(config.opt, abstract.params) if config.opt.frozen else None
    step = train_step.jit_train_step(model, mesh, rules, shardings, batch_keys=build.batch_keys(config), frozen=frozen)
    return mesh, state, step


def time_steps(step, state, batches, steps: int):
    """(state, median seconds per step) over `steps` steps cycling through `batches`."""
    weights, times = jnp.ones(NUM_MODALITIES), []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)], weights)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, float(np.median(times))


def load_average() -> float:
    return os.getloadavg()[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two settings")
    parser.add_argument("--steps", type=int, default=4, help="timed train steps per setting per round")
    parser.add_argument("--batches", type=int, default=12, help="pipeline batches per setting per round")
    parser.add_argument("--num_train", type=int, default=600, help="shapes-world training records written")
    parser.add_argument("--json", default=os.path.join(RESULTS, "pair_packing_pt1_tiny_cpu.json"))
    args = parser.parse_args()
    start_all = time.perf_counter()
    root = tempfile.mkdtemp(prefix="m2omni_pair_packing_")
    config = pt1_config(root, args.num_train)
    for source in sources.make_sources(config).values():  # what m2omni-prepare-data runs
        source.prepare(progress=False)
    config = media.with_cmvn(config, os.path.join(root, "work"))
    tokenizer = tokenizer_lib.get_tokenizer(config)
    configs = {name: replace(config, **{"data.pack_pairs": pairs}) for name, pairs in SETTINGS.items()}
    mesh, state, step = make_step(config, tokenizer)
    state, _ = time_steps(step, state, [pipeline.make_global_batch(b, mesh) for b in
                                        read_batches(config, tokenizer, 2)[0]], 2)  # compile, warm up

    per_round = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]
        for name in order:
            load_before = load_average()
            batches, batches_per_s = read_batches(configs[name], tokenizer, args.batches)
            counts = [row_counts(b, tokenizer.bos_id) for b in batches]
            device_batches = [pipeline.make_global_batch(b, mesh) for b in batches]
            state, step_s = time_steps(step, state, device_batches, args.steps)
            entry = {k: float(np.mean([c[k] for c in counts])) for k in counts[0]}
            entry.update(pipeline_batches_per_s=batches_per_s, step_s=step_s,
                         pairs_per_s=entry["pairs_per_row"] * config.train.batch_size / step_s,
                         load_average=(load_before + load_average()) / 2)
            per_round[name].append(entry)
            print(f"round {r} {name:8s}: {entry['pairs_per_row']:.2f} pairs/row ({entry['image_pairs_per_row']:.2f} "
                  f"image), token fill {entry['token_fill']:.1%}, patch fill {entry['patch_fill']:.1%}, "
                  f"step {step_s * 1e3:.0f} ms, {entry['pairs_per_s']:.1f} pairs/s, pipeline "
                  f"{batches_per_s:.2f} batches/s, load {entry['load_average']:.1f}", flush=True)

    summary = {name: {k: float(np.median([e[k] for e in entries])) for k in entries[0]}
               for name, entries in per_round.items()}
    joined, segments = summary["joined"], summary["segments"]
    seq_len = int(config.data.seq_len)
    unpacked_fill = segments["pair_tokens"] / seq_len
    results = {
        "config": "configs/stages/pt1.py:tiny", "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(), "batch": [int(config.train.batch_size), seq_len],
        "patches_per_row": int(config.data.vision.patches_per_row), "rounds": args.rounds,
        "steps_per_round": args.steps, "batches_per_round": args.batches, "settings": dict(SETTINGS),
        "median": summary, "per_round": per_round,
        "pairs_per_s_ratio_joined_over_segments": joined["pairs_per_s"] / segments["pairs_per_s"],
        "pairs_per_row_ratio_joined_over_segments": joined["pairs_per_row"] / segments["pairs_per_row"],
        "unpacked_one_pair_per_row": {"token_fill": unpacked_fill, "pairs_per_row": 1.0,
                                      "pairs_per_s_at_segments_step": config.train.batch_size / segments["step_s"]},
        "wall_s": time.perf_counter() - start_all,
    }
    print(f"joined / segments: {results['pairs_per_s_ratio_joined_over_segments']:.3f}× pairs/s "
          f"({joined['pairs_per_s']:.1f} vs {segments['pairs_per_s']:.1f}), pairs/row "
          f"{joined['pairs_per_row']:.2f} vs {segments['pairs_per_row']:.2f}, token fill "
          f"{joined['token_fill']:.1%} vs {segments['token_fill']:.1%}; unpacked (1 pair/row): token fill "
          f"{unpacked_fill:.1%}; wall {results['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
