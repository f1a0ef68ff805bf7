"""MetricLogger: plain console lines, exact JSON lines, TensorBoard scalars."""
import glob
import json
import struct

import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2

from m2omni_jax.training.metrics_logging import MetricLogger, format_metrics, read_metrics


def read_scalars(logdir):
    """{tag: {step: value}} from tensorboardX event files (TFRecord framing)."""
    scalars = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def awkward_losses(n):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(n).astype(np.float32) * np.float32(1e-3) + np.float32(1 / 3)
    values[0] = np.nextafter(np.float32(2.0), np.float32(3.0))
    values[1] = np.float32(1e-30)
    return values


def test_plain_lines_jsonl_exact_and_tensorboard(tmp_path, capsys):
    losses = awkward_losses(6)
    logger = MetricLogger(tmp_path, total_steps=5, log_every=2, use_tqdm=None)  # capsys: not a TTY
    for step in range(1, 6):
        metrics = {"loss": jnp.asarray(losses[step]), "loss/text": losses[step], "lr": 3e-4,
                   "grad_norm": np.float32(0.8), "tok/s": 12345.4, "mfu": 0.412, "tokens": np.int64(step)}
        assert logger.log(step, metrics) == (step in (2, 4, 5))
    line = logger.summary({"eval_loss": 1.5})
    logger.close()

    out = capsys.readouterr().out.splitlines()
    assert [o.split(" |")[0] for o in out[:3]] == ["step 2/5", "step 4/5", "step 5/5"]
    assert out[0].endswith("| lr 3e-4 | grad_norm 0.8 | tok/s 12345 | mfu 41.2% | tokens 2")
    assert out[3] == line and line.startswith("done: 5 steps in ")
    assert f"final loss {format_metrics({'x': float(losses[5])})[2:]}" in line and "eval_loss 1.5" in line
    assert f"best loss {format_metrics({'x': float(min(losses[[2, 4, 5]]))})[2:]}" in line

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(records) == [2, 4, 5]
    for step, record in records.items():
        got = np.float32(record["loss"])
        assert got.view(np.uint32) == losses[step].view(np.uint32)
        assert np.float32(record["loss/text"]).view(np.uint32) == losses[step].view(np.uint32)
        assert record["lr"] == 3e-4 and record["tokens"] == step and isinstance(record["tokens"], int)

    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars["loss"]) == {2, 4, 5}
    assert scalars["loss"][4] == losses[4] and scalars["mfu"][2] == np.float32(0.412)


def test_resume_appends_and_last_record_wins(tmp_path, capsys):
    for start, value in ((0, 1.0), (2, 2.0)):
        with MetricLogger(tmp_path, total_steps=4, log_every=1, start_step=start) as logger:
            for step in range(start + 1, start + 3):
                logger.log(step, {"loss": value + step})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert read_metrics(tmp_path / "metrics.jsonl")[4]["loss"] == 6.0


def test_non_main_process_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "w"
    with MetricLogger(workdir, total_steps=2, log_every=1, is_main_process=False) as logger:
        assert not logger.log(1, {"loss": 1.0})
        logger.summary()
    assert not workdir.exists() and capsys.readouterr().out == ""


def test_tqdm_mode_writes_files(tmp_path, capsys):
    with MetricLogger(tmp_path, total_steps=3, log_every=1, use_tqdm=True) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": float(step)})
        logger.summary()
    assert "done: 3 steps" in capsys.readouterr().out
    assert sorted(read_metrics(tmp_path / "metrics.jsonl")) == [1, 2, 3]
