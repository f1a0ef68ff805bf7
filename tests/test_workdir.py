"""Workdirs as URLs: a gs:// workdir stays a URL (no `./gs:/bucket/run`), and the run's files
(the start-up probe, metrics.jsonl, TensorBoard events) go through etils.epath into a bucket
emulated in memory (an fsspec filesystem registered for gs://; no network)."""
import glob
import os
import re
import subprocess
import sys

import fsspec  # noqa: F401  (imports fsspec.registry, patched below)
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from m2omni_jax import cli, workdir as workdir_lib
from m2omni_jax.training import metrics_logging


class Bucket(MemoryFileSystem):
    """An in-memory object store answering gs:// URLs."""
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        path = path[len("gs://"):] if path.startswith("gs://") else path
        return "/" + path.strip("/") if path.strip("/") else ""


@pytest.fixture
def bucket(monkeypatch):
    """gs:// through fsspec (not tf.io.gfile) into `Bucket.store`, for this test only."""
    from etils.epath import backend, gpath
    monkeypatch.setenv("EPATH_USE_TF", "false")
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", Bucket)
    Bucket.store.clear()
    gpath._is_tf_installed.cache_clear()  # cached at epath's first gs:// use (an earlier test's)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield Bucket.store
    gpath._is_tf_installed.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_urls_are_never_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.workdir_path("gs://bucket/run") == "gs://bucket/run"
    assert cli.workdir_path("s3://bucket/a/b") == "s3://bucket/a/b"
    assert cli.workdir_path("run") == str(tmp_path / "run")
    assert os.fspath(workdir_lib.path("gs://bucket/run", "checkpoints")) == "gs://bucket/run/checkpoints"


def test_a_bucket_workdir_is_probed_and_holds_the_metrics_and_events(bucket):
    workdir = "gs://bucket/run"
    workdir_lib.prepare(workdir)
    assert not any(".write_test" in key for key in bucket)  # the probe was written and removed
    for start, steps in ((0, (1, 2)), (2, (3, 4))):  # a run, then its resume: the object is appended to
        with metrics_logging.MetricLogger(workdir, 4, log_every=1, start_step=start, use_tqdm=False) as logger:
            for step in steps:
                logger.log(step, {"loss": 1.0 / step})
    metrics = metrics_logging.read_metrics(f"{workdir}/metrics.jsonl")
    assert {s: m["loss"] for s, m in metrics.items()} == {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25}
    events = [k for k in bucket if k.startswith("/bucket/run/tensorboard/events.out.tfevents")]
    assert events and all(len(bucket[k].getvalue()) > 100 for k in events)  # one per second: the runs may share it
    assert not os.path.exists("gs:")  # nothing went to a local ./gs: folder


def test_an_unwritable_url_is_a_named_error(bucket, monkeypatch):
    monkeypatch.setattr(Bucket, "_open", lambda *a, **k: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(workdir_lib.faults.RunError, match="workdir gs://locked/run is not writable.*denied"):
        workdir_lib.prepare("gs://locked/run")


def test_rewritten_file_writes_the_whole_object_on_flush(bucket):
    path = workdir_lib.path("gs://bucket/x", "log.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("one\n")
    f = workdir_lib.RewrittenFile(path)
    f.write("two\n")
    assert path.read_text() == "one\n"
    f.flush()
    assert path.read_text() == "one\ntwo\n"


# ----------------------------------------------------------------------------- quiet output

OUR_MODULES = {os.path.basename(p) for p in glob.glob(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "m2omni_jax", "**", "*.py"),
    recursive=True)}
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^:\]]+):\d+\] ")
CHATTER = ("orbax", "CheckpointManager", "Unable to initialize backend", "grain", "oneDNN")


@pytest.mark.slow
def test_a_short_training_prints_one_line_per_interval_and_no_third_party_info(tmp_path):
    """4 steps logged every 2: two step lines and the summary on stdout; on stderr only our
    own INFO lines and warnings (~60 s under load)."""
    from test_inference import REPO, SMALL_LLM
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    trained = subprocess.run(
        [sys.executable, "-m", "m2omni_jax.main", f"--config={REPO}/configs/base.py", f"--workdir={tmp_path / 'run'}",
         f"--config.data.dir={tmp_path / 'data'}", f"--config.tokenizer.cache_dir={tmp_path / 'tok'}", *SMALL_LLM,
         "--config.train.steps=4", "--config.train.log_every=2", "--config.checkpoint.every=2"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = trained.stdout.splitlines()
    assert len(out) == 3 and out[0].startswith("step 2/4 | ") and out[1].startswith("step 4/4 | "), out
    assert out[2].startswith("done: 4 steps in "), out
    for line in trained.stderr.splitlines():
        assert not any(word in line for word in CHATTER), line
        match = ABSL_LINE.match(line)
        assert match is None or match[1] != "I" or match[2] in OUR_MODULES, line
