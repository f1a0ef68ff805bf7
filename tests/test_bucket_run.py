"""A short training whose workdir and data directory are gs:// URLs, against a local GCS
emulator (gcp-storage-emulator, in-memory): Orbax writes the checkpoints through tensorstore's
gcs driver (TENSORSTORE_GCS_HTTP_URL), everything else goes through etils.epath and gcsfs
(STORAGE_EMULATOR_HOST). The run is resumed from its bucket checkpoint (~70 s)."""
import json
import os
import socket
import subprocess
import sys

import pytest
from gcp_storage_emulator import server as emulator

from test_inference import REPO, SMALL_LLM


def _with_generation(handler):
    """The emulator's object reads send no `x-goog-generation` header, which tensorstore's
    conditional writes (OCDBT's manifest) need; real GCS sends it."""
    def handler_with_generation(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the handler answered 404
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    return handler_with_generation


@pytest.fixture
def gcs_emulator(monkeypatch):
    from gcp_storage_emulator.handlers import objects
    reads = {objects.download, objects.get}
    monkeypatch.setattr(emulator, "HANDLERS", tuple(
        (regex, {method: _with_generation(h) if h in reads else h for method, h in handlers.items()})
        for regex, handlers in emulator.HANDLERS))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("localhost", port, in_memory=True, default_bucket="bucket")
    server.start()
    url = f"http://localhost:{port}"
    yield dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, EPATH_USE_TF="false",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", GOOGLE_CLOUD_PROJECT="test")
    server.stop()


def test_a_training_on_a_bucket_writes_there_and_resumes_from_there(tmp_path, gcs_emulator):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", M2OMNI_MIRROR_DIR=str(tmp_path / "mirror"),
               **gcs_emulator)

    def train(steps: int) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "m2omni_jax.main", f"--config={REPO}/configs/base.py", "--workdir=gs://bucket/run",
             "--config.data.dir=gs://bucket/data", f"--config.tokenizer.cache_dir={tmp_path / 'tok'}", *SMALL_LLM,
             f"--config.train.steps={steps}", "--config.train.log_every=2", "--config.checkpoint.every=2"],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    train(2)
    resumed = train(4)
    assert "done: 2 steps in " in resumed.stdout  # steps 3 and 4: step 2 was restored from the bucket

    os.environ.update(gcs_emulator)  # this process reads the bucket too
    from etils import epath
    from etils.epath import backend, gpath
    gpath._is_tf_installed.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
    run = epath.Path("gs://bucket/run")
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"2", "4"}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert any((run / "tensorboard").iterdir())
    # The generated corpus went up once, manifest included, from the local mirror.
    corpus = epath.Path("gs://bucket/data/text")
    assert (corpus / "manifest.json").exists() and any(p.name.endswith(".array_record") for p in corpus.iterdir())
