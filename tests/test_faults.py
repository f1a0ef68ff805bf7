"""Faults a run meets and what it does about them (issue 18): non-finite steps, unreadable
checkpoints, bad data, a busy workdir, bad config values, signals during start-up.

Process-level faults run a real tiny text-only `m2omni-train` (marked slow); each item also
has a fast in-process test.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m2omni_jax.training import loop as loop_lib, metrics_logging, train_step
from test_train import run, train_command

TEXT = ["--config.model.kind=llm", "--config.model.audio.enabled=False"]


def text_command(workdir, data_dir, *extra):
    return train_command(workdir, data_dir, *TEXT, *extra)


def strict_json_lines(path):
    """metrics.jsonl parsed by a reader that rejects bare NaN / Infinity (as jq does)."""
    def reject(name):
        raise ValueError(f"not JSON: {name}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=reject) for line in f if line.strip()]


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def saved_state_is_finite(step_dir) -> bool:
    import orbax.checkpoint as ocp
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
               if np.asarray(x).dtype.kind == "f")


# ----------------------------------------------------------------------------- 1. non-finite steps


def test_an_update_that_overflows_the_parameters_is_skipped():
    """A finite loss and gradient, but lr · update overflows float32: the step is skipped."""
    tx = optax.sgd(1e38)

    @train_step.skip_nonfinite
    def step(state, grads):
        updates, opt_state = tx.update(grads, state["opt"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}
        return _Dict(step=state.step + 1, **new), {"loss": jnp.float32(1.0), "grad_norm": optax.global_norm(grads)}

    params = jnp.ones(3, jnp.float32)
    state = _Dict(step=jnp.int32(0), params=params, opt=tx.init(params))
    new, metrics = jax.jit(step)(state, jnp.full(3, 1e3, jnp.float32))
    assert not bool(metrics["finite"]) and int(new.step) == 1
    np.testing.assert_array_equal(np.asarray(new.params), np.ones(3))


class _Dict(dict):
    """A dict pytree with attribute access and `.replace`, standing in for a TrainState."""
    __getattr__ = dict.__getitem__

    def replace(self, **changes):
        return _Dict({**self, **changes})


jax.tree_util.register_pytree_node(_Dict, lambda d: (list(d.values()), list(d.keys())),
                                   lambda keys, values: _Dict(zip(keys, values)))


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite(tmp_path):
    logger = metrics_logging.MetricLogger(str(tmp_path), 2, log_every=1, is_main_process=True, use_tqdm=False)
    logger.log(1, {"loss": float("nan"), "grad_norm": float("inf"), loop_lib.SKIPPED_KEY: 1})
    logger.log(2, {"loss": 2.5, "grad_norm": 1.0, loop_lib.SKIPPED_KEY: 1})
    logger.close()
    first, second = strict_json_lines(tmp_path / "metrics.jsonl")
    assert first["loss"] is None and first["grad_norm"] is None and second["loss"] == 2.5
    read = metrics_logging.read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(read[1]["loss"]) and read[1]["train/skipped_nonfinite"] == 1


@pytest.mark.slow
def test_a_huge_learning_rate_skips_steps_and_saves_only_finite_states(tmp_path):
    workdir, data_dir = tmp_path / "work", tmp_path / "data"
    result = run(text_command(workdir, data_dir, "--config.train.steps=12", "--config.opt.peak_lr=1e4",
                              "--config.checkpoint.every=4", "--config.train.max_nonfinite_steps=100"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = strict_json_lines(workdir / "metrics.jsonl")
    assert records[-1]["train/skipped_nonfinite"] > 0 and "train/skipped_nonfinite" in result.stdout
    assert checkpoint_steps(workdir) == [4, 8, 12]
    assert all(saved_state_is_finite(workdir / "checkpoints" / str(s)) for s in (4, 8, 12))

    stopped = run(text_command(workdir, data_dir, "--config.train.steps=40", "--config.opt.peak_lr=1e4",
                                   "--config.train.max_nonfinite_steps=2"))
    assert stopped.returncode == 1
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert last_line.startswith("m2omni-train: ") and "max_nonfinite_steps=2" in last_line
    assert "Traceback" not in stopped.stderr
    assert checkpoint_steps(workdir)[-1] < 40  # nothing saved after the run gave up


@pytest.mark.slow
def test_a_run_that_skipped_non_finite_steps_resumes_bitwise(tmp_path):
    """Stopped at step 6 (with skipped steps before it) and resumed to 12 = 12 straight steps:
    the same losses (NaN where skipped) and the same skip count, step by step."""
    data_dir = tmp_path / "data"
    huge = ["--config.opt.peak_lr=1e4", "--config.train.max_nonfinite_steps=100", "--config.checkpoint.every=4"]
    first = run(text_command(tmp_path / "resumed", data_dir, "--config.train.steps=6", *huge))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(text_command(tmp_path / "resumed", data_dir, "--config.train.steps=12", *huge))
    assert resumed.returncode == 0 and "resumed from step 6" in resumed.stderr, resumed.stderr[-3000:]
    straight = run(text_command(tmp_path / "straight", data_dir, "--config.train.steps=12", *huge))
    assert straight.returncode == 0, straight.stderr[-3000:]

    def by_step(workdir):
        return {r["step"]: r for r in strict_json_lines(workdir / "metrics.jsonl") if "loss" in r}
    got, want = by_step(tmp_path / "resumed"), by_step(tmp_path / "straight")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    assert want[12].get("train/skipped_nonfinite", 0) > 0  # the fault happened
    for step in want:
        assert got[step]["loss"] == want[step]["loss"], step  # bitwise (None where non-finite)
        assert got[step].get("train/skipped_nonfinite") == want[step].get("train/skipped_nonfinite"), step


# ----------------------------------------------------------------------------- 2. unreadable checkpoints


def array_files(step_dir):
    """The OCDBT data files: `state/ocdbt.process_0/d/*` and (small arrays inlined in the
    merged tree) `state/d/*`."""
    return [p for p in (step_dir / "state").rglob("*") if p.parent.name == "d" and p.is_file()]


def truncate_arrays(step_dir):
    for path in array_files(step_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_arrays(step_dir):
    for path in array_files(step_dir):
        path.unlink()


def empty_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate_arrays, delete_arrays, empty_metadata])
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_older_one_resumes(tmp_path, damage, caplog):
    from test_loop import fresh_state, make_loop
    straight, _ = make_loop(tmp_path / "straight", 10).run(fresh_state())
    make_loop(tmp_path / "w", 8).run(fresh_state())  # checkpoints 4 and 8
    damage(tmp_path / "w" / "checkpoints" / "8")
    resumed, _ = make_loop(tmp_path / "w", 10).run(fresh_state())
    np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(straight.params))  # from step 4, bitwise
    names = os.listdir(tmp_path / "w" / "checkpoints")
    assert any(n.startswith("8.unreadable-") for n in names) and checkpoint_steps(tmp_path / "w") == [4, 8, 10]  # 8 saved anew
    assert "checkpoint step 8" in caplog.text and "unreadable" in caplog.text


def test_no_readable_checkpoint_is_one_error_naming_the_directory(tmp_path):
    from m2omni_jax import faults
    from test_loop import fresh_state, make_loop
    make_loop(tmp_path / "w", 4).run(fresh_state())
    delete_arrays(tmp_path / "w" / "checkpoints" / "4")
    with pytest.raises(faults.RunError, match=f"no readable checkpoint in {tmp_path}/w/checkpoints .*step 4: "):
        make_loop(tmp_path / "w", 6).run(fresh_state())
    assert checkpoint_steps(tmp_path / "w") == [4]  # nothing renamed: it may be this config that does not fit


# ----------------------------------------------------------------------------- 3. bad data


def corrupt(src, dst, offset):
    data = bytearray(open(src, "rb").read())
    data[offset:offset + 64] = bytes(b ^ 0xFF for b in data[offset:offset + 64])
    open(dst, "wb").write(bytes(data))


def corpus_file(tmp_path):
    """One ArrayRecord file of 50 JSON text records (group_size 1: one record per chunk)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    path = str(tmp_path / "good.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i in range(50):
        writer.write(json.dumps({"text": f"document {i} " + "words " * 20}).encode())
    writer.close()
    return path


def test_a_damaged_chunk_is_a_bad_record_and_a_damaged_footer_names_the_file(tmp_path, caplog):
    from m2omni_jax import faults
    from m2omni_jax.data import records, sources
    good = corpus_file(tmp_path)
    chunk, footer = str(tmp_path / "chunk.array_record"), str(tmp_path / "footer.array_record")
    corrupt(good, chunk, 100)  # inside the first record's chunk header
    files = sources.ArrayRecordFiles([good, chunk])
    assert len(files) == 100 and files[0] == grain_record(good, 0)
    assert files[50] == b"" and files[51] == grain_record(good, 1)
    assert f"{chunk}: unreadable record 0" in caplog.text
    with pytest.raises(ValueError, match="empty record"):
        records.decode_record(files[50])
    corrupt(good, footer, (os.path.getsize(good) - 1) // 65536 * 65536 + 100)  # the footer opens the last 64 KiB block
    with pytest.raises(faults.RunError, match=f"cannot open ArrayRecord file {footer}: "):
        sources.ArrayRecordFiles([good, footer])


def grain_record(path, index):
    import grain
    return grain.sources.ArrayRecordDataSource([path])[index]


def test_bad_records_and_truncations_are_logged_every_step(tmp_path):
    iterator = type("Counted", (), {"stats": {"bad_records": 3, "truncated_docs": 2, "batches": 5}})()
    assert loop_lib.data_counts(iterator) == {"data/bad_records": 3, "data/truncated": 2}
    assert loop_lib.data_counts(iter([])) == {}


def test_a_garbage_tokenizer_model_names_its_path(tmp_path):
    from m2omni_jax import faults
    from m2omni_jax.data import tokenizer
    path = tmp_path / "garbage.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(faults.RunError, match=f"tokenizer {path} is not a SentencePiece model"):
        tokenizer.Tokenizer(str(path))


@pytest.mark.slow
def test_a_damaged_corpus_trains_with_its_bad_records_counted(tmp_path):
    data_dir = tmp_path / "data"
    first = run(text_command(tmp_path / "first", data_dir, "--config.train.steps=1"))  # writes the corpus
    assert first.returncode == 0, first.stderr[-3000:]
    for shard in (data_dir / "text").glob("*.array_record"):
        for offset in range(100, 20000, 1000):
            corrupt(shard, shard, offset)
    result = run(text_command(tmp_path / "work", data_dir, "--config.train.steps=6"))
    assert result.returncode == 0, result.stderr[-3000:]
    last = strict_json_lines(tmp_path / "work" / "metrics.jsonl")[-1]
    assert last["data/bad_records"] > 0 and "data/truncated" in last
    assert "data/bad_records" in result.stdout and "unreadable record" in result.stderr


# ----------------------------------------------------------------------------- 4. one run per workdir


def lock_in_subprocess(workdir, hold: bool):
    """A second process taking the lock: holding it (sleeps) or exiting at once (a dead run)."""
    import subprocess
    import sys
    code = (f"from m2omni_jax import workdir; workdir.lock({str(workdir)!r}); print('locked', flush=True)"
            + ("; import time; time.sleep(60)" if hold else ""))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_a_second_run_in_a_workdir_fails_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import socket
    from m2omni_jax import faults, workdir
    holder = lock_in_subprocess(tmp_path, hold=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(faults.RunError, match=f"workdir {tmp_path} in use by pid {holder.pid} on host "
                                                  f"{socket.gethostname()}"):
            workdir.lock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "other").mkdir()
    dead = lock_in_subprocess(tmp_path / "other", hold=False)
    dead.wait()
    assert (tmp_path / "other" / "run.lock").read_text().split()[0] == str(dead.pid)  # left behind
    fd = workdir.lock(str(tmp_path / "other"))  # the dead run's lock is taken over
    assert (tmp_path / "other" / "run.lock").read_text().split()[0] == str(os.getpid())
    os.close(fd)


def test_a_workdir_that_cannot_be_written_fails_at_once_naming_it(tmp_path):
    from m2omni_jax import faults, workdir
    (tmp_path / "file").write_text("")
    with pytest.raises(faults.RunError, match=f"workdir {tmp_path}/file/run is not writable"):
        workdir.prepare(str(tmp_path / "file" / "run"))


# ----------------------------------------------------------------------------- 5. config and start-up


@pytest.mark.parametrize("field,value", [("train.steps", 0), ("train.log_every", 0), ("checkpoint.every", -1),
                                         ("checkpoint.keep", 0)])
def test_a_non_positive_run_length_names_its_field(field, value):
    from m2omni_jax import build, faults
    from test_train import base_config
    config = base_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(faults.ConfigError, match=f"config.{field}={value} must be a positive integer"):
        build.validate_config(config, num_devices=8, process_count=1)


def test_a_warmup_longer_than_a_short_run_is_clipped(caplog):
    from m2omni_jax import build
    from test_train import base_config
    config = base_config()
    config.train.steps = 30  # the README's smoke run; configs/tiny.py warms up over 50
    config = build.validate_config(config, num_devices=8, process_count=1)
    assert config.opt.warmup_steps == 30 and "config.opt.warmup_steps=50" in caplog.text


def test_a_config_error_is_one_line_and_exit_2(tmp_path):
    result = run(text_command(tmp_path / "w", tmp_path / "d", "--config.train.log_every=0"), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "m2omni-train: config.train.log_every=0 must be a positive integer"
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()  # failed before the workdir


def test_a_failed_background_save_is_one_error_with_its_cause(tmp_path, monkeypatch):
    from m2omni_jax import faults
    from m2omni_jax.training import checkpointing
    checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=1)
    with checkpointer:
        def fail():
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(checkpointer._manager, "check_for_errors", fail)
        with pytest.raises(faults.RunError, match=f"saving a checkpoint to {tmp_path}/checkpoints failed: "
                                                  "OSError: .*No space left on device"):
            checkpointer.check()
        monkeypatch.undo()


# ----------------------------------------------------------------------------- 6. signals


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_is_a_short_message_and_exit_0(tmp_path, signum):
    import signal
    import subprocess
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(text_command(tmp_path / "w", tmp_path / "d", "--config.train.steps=5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import time
    deadline = time.time() + 60
    while not (tmp_path / "w" / "run.lock").exists() and time.time() < deadline:  # start-up under way
        time.sleep(0.02)
    proc.send_signal(getattr(signal, signum))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"m2omni-train: stopped by {signum} outside the training steps")
    assert "Traceback" not in stderr
