"""End-to-end training through the CLI: config errors, SIGTERM + exact resume."""
import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from m2omni_jax import build
from m2omni_jax.training.metrics_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.model.llm.width=64", "--config.model.llm.depth=2", "--config.model.llm.num_heads=4",
    "--config.model.llm.num_kv_heads=2", "--config.model.llm.head_dim=16",
    "--config.model.llm.mrope_sections=(2,3,3)", "--config.model.llm.mlp_dim=128",
    "--config.data.sources.text.num_docs=400", "--config.data.seq_len=64", "--config.train.batch_size=8",
    "--config.tokenizer.vocab_size=512", "--config.model.llm.vocab_size=512",
    "--config.data.sources.text.tokenizer_docs=400", "--config.train.log_every=1", "--config.checkpoint.every=1000",
    "--config.model.audio.width=32", "--config.model.audio.depth=2", "--config.model.audio.mlp_dim=64",
    "--config.data.sources.shapes_world.speech.num_train=40", "--config.data.sources.shapes_world.speech.num_eval=8",
    "--config.data.audio.cmvn_samples=20",
    # A constant LR after warmup, so a run's schedule does not depend on its length.
    "--config.opt.decay=constant", "--config.opt.warmup_steps=3", "--config.opt.peak_lr=1e-2",
]


def train_command(workdir, data_dir, *extra):
    return [sys.executable, "-m", "m2omni_jax.main", f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", f"--config.tokenizer.cache_dir={data_dir}/tokenizer", *SMALL, *extra]


def run(cmd, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def losses(workdir):
    return {step: record["loss"] for step, record in read_metrics(os.path.join(workdir, "metrics.jsonl")).items()}


def test_sigterm_then_resume_gives_bitwise_identical_losses(tmp_path):
    data_dir, killed, straight = tmp_path / "data", tmp_path / "killed", tmp_path / "straight"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(train_command(killed, data_dir, "--config.train.steps=100000"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    saved_step = max(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
    assert 8 <= saved_step < 100000
    assert max(losses(killed)) == saved_step  # it stopped right after saving the step it was on

    total = saved_step + 6
    resumed = run(train_command(killed, data_dir, f"--config.train.steps={total}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved_step}" in resumed.stderr
    reference = run(train_command(straight, data_dir, f"--config.train.steps={total}"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    got, want = losses(killed), losses(straight)
    assert sorted(got) == sorted(want) == list(range(1, total + 1))
    assert [got[s] for s in want] == [want[s] for s in want]  # bitwise, every step
    assert want[total] < 0.8 * want[1]  # and it learns


@pytest.mark.slow
def test_tiny_config_trains_with_audio_and_reads_cmvn_back(tmp_path):
    data_dir, workdir = tmp_path / "data", tmp_path / "work"
    small_world = ["--config.data.sources.shapes_world.num_train=200", "--config.data.sources.shapes_world.num_eval=50",
                   "--config.data.seq_len=128"]  # room for a clip's 48 placeholders and its text
    first = run(train_command(workdir, data_dir, "--config.train.steps=3", *small_world))
    assert first.returncode == 0, first.stderr[-3000:]
    cmvn = (workdir / "cmvn.json").read_text()  # measured on the training speech by the first run
    assert "shapes_speech-train" in first.stderr  # the speech split is generated, with a progress bar
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert sorted(metrics) == [1, 2, 3] and any("loss/audio" in m for m in metrics.values())

    resumed = run(train_command(workdir, data_dir, "--config.train.steps=5", *small_world))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stderr and "shapes_speech-train" not in resumed.stderr  # cached
    assert (workdir / "cmvn.json").read_text() == cmvn
    assert sorted(read_metrics(os.path.join(workdir, "metrics.jsonl"))) == [1, 2, 3, 4, 5]


def test_periodic_held_out_eval_is_logged_beside_the_losses(tmp_path):
    data_dir, workdir = tmp_path / "data", tmp_path / "work"
    result = run(train_command(workdir, data_dir, "--config.train.steps=4", "--config.eval.every=2",
                               "--config.eval.num_samples=40", "--config.eval.periodic_num_samples=8",
                               "--config.eval.max_new_tokens=4",
                               "--config.data.sources.shapes_world.num_train=200", "--config.data.sources.shapes_world.num_eval=50",
                               "--config.model.audio.enabled=False", "--config.data.modality_weights.audio=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval at step 2 |" in result.stdout and "eval at step 4 |" in result.stdout
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    for step in (2, 4):  # the step's losses and its evaluation, merged
        assert "loss" in metrics[step] and 0.0 <= metrics[step]["eval/vqa_accuracy/overall"] <= 1.0
        assert metrics[step]["eval/num_records"] == 8  # eval.periodic_num_samples, not num_samples
    assert not any(k.startswith("eval/") for k in metrics[3])
    assert sorted(p.name for p in (workdir / "plots").iterdir()) == ["losses.png"]  # main.py: after training


def test_unknown_config_key_is_one_clear_error(tmp_path):
    result = run(train_command(tmp_path / "w", tmp_path / "d", "--config.train.stepz=3"), timeout=120)
    assert result.returncode == 2  # as every config error
    last = result.stderr.strip().splitlines()[-1]
    assert "'stepz'" in last and 'Did you mean "steps"' in last
    assert "Traceback" not in result.stderr


def base_config():
    sys.path.insert(0, REPO)
    from configs import tiny
    return tiny.get_config()


@pytest.mark.parametrize("field,value,match", [
    ("train.batch_size", 12, "batch_size=12 must be a positive multiple"),
    ("mesh", {"data": 3, "fsdp": 1, "expert": 1, "tensor": 1}, "has 3 devices but 8"),
    ("train.loss_weights", {"imgae": 2.0}, "unknown modality 'imgae'"),
    ("model.llm.vocab_size", 100, "tokenizer.vocab_size=1024 exceeds"),
    ("model.audio.enabled", False, "'audio' weight 0.15, but config.model.audio.enabled=False"),
    ("data.audio.clips_per_row", 0, "config.data.audio.clips_per_row=0 must be positive"),
])
def test_bad_config_fails_before_compiling(field, value, match):
    config = base_config()
    section, _, key = field.rpartition(".")
    target = config[section] if section else config
    target[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=match):
        build.validate_config(config, num_devices=8, process_count=1)


def test_omni_mfu_counts_the_vision_tower():
    from configs import tiny
    from m2omni_jax.models.llm import training_flops_per_token
    config = tiny.get_config()
    from m2omni_jax.models import omni, vision
    model = omni.OmniModel(omni.OmniConfig.from_config(config.model, placeholder_ids=(5, 6)))
    llm_only = training_flops_per_token(model.config.llm, config.data.seq_len)
    towers = build.model_flops_per_token(config, model) - llm_only
    tower_only = vision.training_flops_per_pack(model.config.vision, config.data.vision.patches_per_row)
    assert towers * config.data.seq_len > tower_only  # the connector is counted too


def test_prepare_data_writes_the_world_its_overrides_name(tmp_path):
    from m2omni_jax.experiments.shapes_world import writer as write_shapes_world
    data_dir = tmp_path / "data"
    tasks = "('caption','vqa_shape','vqa_locate')"
    proc = run([sys.executable, "-m", "m2omni_jax.prepare_data", f"--config={REPO}/configs/experiments/shapes_world_vqa.py",
                f"--workdir={tmp_path}/unused", f"--config.data.dir={data_dir}", "--config.data.sources.text.num_docs=200",
                "--config.data.sources.shapes_world.num_train=30", "--config.data.sources.shapes_world.num_eval=8",
                f"--config.data.sources.shapes_world.tasks={tasks}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    world = data_dir / "shapes_world" / write_shapes_world.dataset_key(0, 30, 8, eval(tasks))
    assert f"shapes_world: {world}" in proc.stdout
    with open(world / "manifest.json") as f:
        assert tuple(json.load(f)["tasks"]) == eval(tasks)
    assert (data_dir / "text").is_dir() and (data_dir / "text_eval").is_dir()
    assert not (tmp_path / "unused").exists() and "speech" not in proc.stdout  # the :vqa run has no audio
