"""Step-balance calibration trains each modality alone in rounds until its loss plateaus."""
import json
import math
import sys

import numpy as np
import pytest

from m2omni_jax import calibrate
from m2omni_jax.config_fields import ConfigError
from m2omni_jax.training import balance
from m2omni_jax.training.metrics_logging import read_metrics
from test_train import REPO, SMALL, run


def curve_round(calls, tail):
    """A training curve L(s) = 1 + 2·exp(-s/50), logged every step; records each round's length."""
    def run_round(steps):
        calls.append(steps)
        s = np.arange(1, steps + 1)
        return balance.tail_convergence(list(s), list(1 + 2 * np.exp(-s / 50)), tail)
    return run_round


def test_rounds_stop_at_the_first_plateau():
    # Over the last 10 steps (centre s̄ = s - 4.5) the fitted change is ≈ -(2/50)·e^(-s̄/50)·9 / L(s̄):
    # -4.1% at s = 100, -0.66% at 200.
    calls = []
    stats, steps = calibrate.train_to_plateau(curve_round(calls, 10), 100, 1000, 10, 0.02)
    assert calls == [100, 200] and steps == 200
    assert stats["converged_loss"] == pytest.approx(np.mean(1 + 2 * np.exp(-np.arange(191, 201) / 50)))
    slope_at_100 = -(2 / 50) * math.exp(-95.5 / 50) * 9 / (1 + 2 * math.exp(-95.5 / 50))
    assert calibrate.train_to_plateau(curve_round([], 10), 100, 100, 10, 0.02)[0]["relative_change"] == \
        pytest.approx(slope_at_100, rel=0.02)


def test_rounds_end_at_max_steps_and_bad_flags_are_named():
    calls = []
    _, steps = calibrate.train_to_plateau(curve_round(calls, 10), 100, 250, 10, 1e-9)
    assert calls == [100, 200, 250] and steps == 250
    with pytest.raises(ConfigError, match=r"--max_steps=50 must be at least --steps=100"):
        calibrate.train_to_plateau(curve_round([], 10), 100, 50, 10, 0.02)
    with pytest.raises(ConfigError, match=r"--tail=60"):
        calibrate.train_to_plateau(curve_round([], 60), 100, 1000, 60, 0.02)


@pytest.mark.slow
def test_calibration_resumes_each_round_and_writes_the_file(tmp_path):
    # Text alone, rounds of 6 steps; a plateau tolerance no curve meets, so it runs to --max_steps
    # in three rounds that resume one run (steps 1..18 logged once each, one curve).
    cmd = [sys.executable, "-m", "m2omni_jax.calibrate", f"--config={REPO}/configs/tiny.py",
           f"--workdir={tmp_path}/calib", f"--config.data.dir={tmp_path}/data",
           f"--config.tokenizer.cache_dir={tmp_path}/data/tokenizer", *SMALL,
           "--config.model.kind=llm", "--config.model.audio.enabled=False",
           "--config.balance.modalities=('text',)", "--steps=6", "--max_steps=18", "--tail=3",
           "--max_tail_change=0"]
    result = run(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = read_metrics(f"{tmp_path}/calib/text/metrics.jsonl")
    assert sorted(s for s in records if "loss" in records[s]) == list(range(1, 19))
    data = json.load(open(f"{tmp_path}/calib/converged_losses.json"))
    tail = [records[s]["loss"] for s in (16, 17, 18)]
    assert data["converged_losses"]["text"] == pytest.approx(np.mean(tail))
    assert data["convergence"]["steps"] == {"text": 18}
    assert "not at a plateau" in result.stderr
