"""The one training loop: resume (state, data position, callbacks' extra JSON), non-finite steps
skipped and counted, callbacks, stop requests."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from m2omni_jax.training import loop as loop_lib, train_step
from m2omni_jax.training.metrics_logging import read_metrics


@struct.dataclass
class State:
    step: jax.Array
    params: jax.Array
    opt_state: object
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def fresh_state():
    tx = optax.sgd(0.1)
    params = jnp.zeros(3, jnp.float32)
    return State(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


@train_step.skip_nonfinite
def _step(state, batch):
    def loss_fn(p):
        return jnp.sum((p - batch["target"]) ** 2) * batch["scale"]
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state),
            {"loss": loss, "grad_norm": optax.global_norm(grads)})


step_fn = jax.jit(_step, donate_argnums=(0,))


def batches(first_step, nan_at=()):
    """A function of the step (nothing to checkpoint); a NaN scale at the steps in `nan_at`."""
    step = first_step
    while True:
        step += 1
        yield {"target": np.full(3, step % 5, np.float32), "scale": np.float32(np.nan if step in nan_at else 1.0)}


class Counter(loop_lib.Callback):
    """Counts its calls; saves the count in the checkpoint's extra JSON."""
    label = None

    def __init__(self):
        self.calls, self.finished = 0, False

    def after_step(self, step, state):
        self.calls += 1
        return {"calls": float(self.calls)}

    def checkpoint_extra(self):
        return {"counter": self.calls}

    def restore(self, extra):
        self.calls = extra["counter"]

    def finish(self, state):
        self.finished = True
        return {"final_param": float(state.params[0])}


def make_loop(workdir, steps, *, nan_at=(), callbacks=(), max_nonfinite=3, checkpoint_every=4):
    options = loop_lib.LoopOptions(steps=steps, log_every=1, checkpoint_every=checkpoint_every, checkpoint_keep=3,
                                   async_checkpoint=False, max_nonfinite_steps=max_nonfinite)
    return loop_lib.Loop(step_fn, lambda first: batches(first, nan_at), options, str(workdir),
                         to_global=lambda b: b, callbacks=callbacks)


def test_resume_continues_bitwise_with_the_callbacks_state(tmp_path):
    straight, _ = make_loop(tmp_path / "straight", 8).run(fresh_state())
    counter = Counter()
    make_loop(tmp_path / "split", 5, callbacks=[counter]).run(fresh_state())
    assert counter.finished and counter.calls == 5
    resumed_counter = Counter()
    resumed, last = make_loop(tmp_path / "split", 8, callbacks=[resumed_counter]).run(fresh_state())
    assert resumed_counter.calls == 8 and last["calls"] == 8.0  # the count came back from the checkpoint
    np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(straight.params))
    got = read_metrics(tmp_path / "split" / "metrics.jsonl")
    want = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert sorted(got) == list(range(1, 9)) and [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]
    assert last["final_param"] == float(resumed.params[0])


def test_a_non_finite_step_is_skipped_and_counted_across_a_resume(tmp_path):
    state, last = make_loop(tmp_path / "nan", 6, nan_at=(3,)).run(fresh_state())
    metrics = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert not np.isfinite(metrics[3]["loss"]) and "train/skipped_nonfinite" not in metrics[2]
    assert metrics[6]["train/skipped_nonfinite"] == 1 and last["train/skipped_nonfinite"] == 1
    assert int(state.step) == 6 and np.all(np.isfinite(np.asarray(state.params)))
    _, last = make_loop(tmp_path / "nan", 7, nan_at=(3,)).run(fresh_state())
    assert last["train/skipped_nonfinite"] == 1  # the count is in the checkpoint


def test_the_state_before_a_non_finite_step_is_kept():
    state = fresh_state()
    good = {"target": np.ones(3, np.float32), "scale": np.float32(1.0)}
    state, metrics = step_fn(state, good)
    before = np.asarray(state.params).copy()
    state, metrics = step_fn(state, dict(good, scale=np.float32(np.nan)))
    assert not bool(metrics["finite"]) and int(state.step) == 2
    np.testing.assert_array_equal(np.asarray(state.params), before)


def test_consecutive_non_finite_steps_stop_the_run_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=3"):
        make_loop(tmp_path / "w", 20, nan_at=range(5, 20)).run(fresh_state())
    saved = sorted(int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit())
    assert saved == [4]  # the last good checkpoint stays; nothing after the non-finite steps


def test_a_periodic_callback_records_its_own_line(tmp_path, capsys):
    seen = []
    periodic = loop_lib.Periodic(3, lambda state: seen.append(int(state.step)) or {"eval/x": 1.0}, last_step=7)
    make_loop(tmp_path / "w", 7, callbacks=[periodic]).run(fresh_state())
    assert seen == [3, 6, 7]
    assert "eval at step 3 |" in capsys.readouterr().out
    metrics = read_metrics(tmp_path / "w" / "metrics.jsonl")
    assert metrics[3]["eval/x"] == 1.0 and "eval/x" not in metrics[4]


def test_max_nonfinite_steps_must_be_positive():
    from configs import base
    from m2omni_jax.run_config import RunConfig
    config = base.get_config()
    config.train.max_nonfinite_steps = 0
    with pytest.raises(ValueError, match="config.train.max_nonfinite_steps=0"):
        loop_lib.LoopOptions.from_config(RunConfig.of(config))
