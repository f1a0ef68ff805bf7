"""Multi-host training: 2 processes × 4 CPU devices (jax.distributed, a local coordinator, gloo
collectives) give the same per-step losses as 1 process × 8 devices, and their checkpoint
restores in one process. Each process runs tests/multihost_worker.py."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from m2omni_jax.training.metrics_logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _launch(*args):
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=400):
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def _losses(workdir):
    return {step: r["loss"] for step, r in read_metrics(os.path.join(workdir, "metrics.jsonl")).items()}


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
    data, one, two = tmp_path / "data", tmp_path / "one", tmp_path / "two"
    port = _free_port()  # first, so process 0 writes the text corpus and tokenizer that all the runs read
    outputs = _finish([_launch("train", two, data, STEPS, i, 2, port) for i in range(2)])
    _finish([_launch("train", one, data, STEPS)])

    want, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
    assert want[STEPS] < 0.8 * want[1]  # it learns
    assert f"step {STEPS}/{STEPS}" in outputs[0] and "step 1/" not in outputs[1]  # process 0 logs alone
    data_iter = sorted(os.listdir(two / "checkpoints" / str(STEPS) / "data_iter"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_iter)  # each process's data position

    out = _finish([subprocess.Popen([sys.executable, WORKER, "restore", two / "checkpoints", one / "checkpoints",
                                     data], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)])[0]
    restored = json.loads(out.strip().splitlines()[-1])
    assert restored["devices"] == 8 and restored["steps"] == [STEPS, STEPS]
    assert restored["max_param_diff"] < 1e-5
