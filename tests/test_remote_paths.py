"""Workdir and output paths as URLs: the commands' files (calibration metrics and results,
CMVN statistics, speech WAVs, init_from) go through etils.epath into the in-memory gs://
bucket of test_workdir, and relative paths resolve against a URL without becoming `gs:/`."""
import io
import json
import os
import wave

import numpy as np

from configs import tiny
from m2omni_jax import calibrate, workdir as workdir_lib
from m2omni_jax.data import audio as audio_frontend, media
from m2omni_jax.models import vocoder
from m2omni_jax.run_config import RunConfig
from m2omni_jax.training import balance
from m2omni_jax.training.metrics_logging import MetricLogger
from test_workdir import bucket  # noqa: F401  (the fixture)


def test_relative_paths_resolve_against_urls_and_local_dirs(tmp_path):
    assert workdir_lib.resolve("../stage1", "gs://b/runs/stage2") == "gs://b/runs/stage1"
    assert workdir_lib.resolve("prev", "gs://b/runs/") == "gs://b/runs/prev"
    assert workdir_lib.resolve("gs://other/x", "/tmp/run") == "gs://other/x"
    assert workdir_lib.resolve("/abs/ckpt/", "gs://b/run") == "/abs/ckpt"
    assert workdir_lib.resolve("../stage1", str(tmp_path / "stage2")) == str(tmp_path / "stage1")


def test_calibration_reads_its_metrics_and_writes_its_result_in_a_bucket(bucket):  # noqa: F811
    run_dir = "gs://bucket/calib/text"
    with MetricLogger(run_dir, 20, log_every=1, use_tqdm=False) as logger:
        for step in range(1, 21):
            logger.log(step, {"loss": 1.0 + 1.0 / step})
    stats = calibrate.convergence(run_dir, tail=10)
    assert abs(stats["converged_loss"] - np.mean([1.0 + 1.0 / s for s in range(11, 21)])) < 1e-9
    path = os.fspath(workdir_lib.path("gs://bucket/calib", "converged_losses.json"))
    balance.save_calibration(path, {"text": stats["converged_loss"]})
    assert json.loads(bucket["/bucket/calib/converged_losses.json"].getvalue())["converged_losses"]["text"] > 1
    assert balance.load_calibration(path) == {"text": stats["converged_loss"]}


def test_cmvn_statistics_are_read_from_a_bucket_workdir(bucket):  # noqa: F811
    stats = {"mean": np.arange(560, dtype=np.float32), "std": np.ones(560, np.float32), "count": 7}
    audio_frontend.save_cmvn("gs://bucket/run/cmvn.json", stats)
    config = RunConfig.of(tiny.get_config())
    config = media.with_cmvn(config, "gs://bucket/run", compute=False)
    assert config.data.audio.cmvn_file == "gs://bucket/run/cmvn.json"  # not ./gs:/bucket/run/cmvn.json
    assert audio_frontend.load_cmvn(config.data.audio.cmvn_file)["count"] == 7
    assert not os.path.exists("gs:")


def test_path_only_writers_reach_a_bucket_through_a_local_copy(bucket, tmp_path):  # noqa: F811
    tone = np.sin(np.linspace(0, 200, 1600)).astype(np.float32)
    with workdir_lib.local_file(workdir_lib.path("gs://bucket/run", "wavs", "00_reference.wav")) as local:
        assert not local.startswith("gs:")
        vocoder.write_wav(local, tone, 16000)
    with wave.open(io.BytesIO(bucket["/bucket/run/wavs/00_reference.wav"].getvalue())) as f:
        assert (f.getnframes(), f.getframerate()) == (1600, 16000)
    local_target = tmp_path / "out" / "a.wav"
    with workdir_lib.local_file(local_target) as local:  # a local path: written in place
        assert local == str(local_target)
        vocoder.write_wav(local, tone, 16000)
    assert local_target.stat().st_size == 44 + 2 * 1600
