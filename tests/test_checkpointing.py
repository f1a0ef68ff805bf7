"""Checkpointer: sharded round trip, retention, grain iterator, junk dirs, SIGTERM."""
import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from m2omni_jax.parallel.sharding import make_mesh
from m2omni_jax.training.checkpointing import Checkpointer, StopSignal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array  # typed key
    raw_rng: jax.Array  # uint32 key data
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def make_state(mesh, seed=0):
    tx = optax.adam(1e-3)
    w_sharding = NamedSharding(mesh, P("data", None))
    params = {"w": jax.device_put(jax.random.normal(jax.random.key(seed), (16, 4)), w_sharding),
              "b": jax.device_put(jnp.arange(4.0) + seed, NamedSharding(mesh, P()))}
    params = jax.tree.map(lambda x: x + 0, params)  # keep input shardings
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    replicated = NamedSharding(mesh, P())
    return State(step=jax.device_put(jnp.int32(7 + seed), replicated), params=params, opt_state=opt_state,
                 rng=jax.device_put(jax.random.key(seed + 1), replicated),
                 raw_rng=jax.device_put(jax.random.PRNGKey(seed + 2), replicated), tx=tx)


def abstract(state, sharding_fn=lambda x: x.sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_into_other_shardings(tmp_path):
    mesh = make_mesh({"data": -1})
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state, extra={"weights": np.array([0.5, 2.0]), "note": "x", "n": np.int64(3)})
        ckpt.wait()

    # Restore on a different mesh layout: (data=2, fsdp=4), w split over fsdp.
    mesh2 = make_mesh({"data": 2, "fsdp": 4})
    w_target = NamedSharding(mesh2, P("fsdp", None))
    rep = NamedSharding(mesh2, P())
    target = abstract(state, lambda x: w_target if x.shape == (16, 4) else rep)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.latest_step() == 7
        restored, extra = ckpt.restore(target)
    assert isinstance(restored, State) and restored.tx is state.tx
    assert_same(restored, state)
    assert restored.rng.dtype == state.rng.dtype and restored.raw_rng.dtype == jnp.uint32
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    assert extra == {"weights": [0.5, 2.0], "note": "x", "n": 3}


def test_save_every_keep_and_force(tmp_path):
    mesh = make_mesh({"data": -1})
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=2, keep=2, async_save=True) as ckpt:
        saved = [step for step in range(1, 8) if ckpt.save(step, state)]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, state, force=True)
        assert not ckpt.save(7, state, force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert not ckpt.should_save(6) and ckpt.should_save(8)
        _, extra = ckpt.restore(abstract(state), step=6)
        assert extra == {}


def test_async_save_survives_buffer_donation(tmp_path):
    sharding = NamedSharding(make_mesh({"data": -1}), P("data"))
    state = {"w": jax.device_put(jnp.arange(64.0), sharding)}
    target = abstract(state)
    zero = jax.jit(lambda s: jax.tree.map(jnp.zeros_like, s), donate_argnums=0)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=True) as ckpt:
        ckpt.save(1, state)
        state = zero(state)  # the training step reuses the saved buffers right away
        ckpt.wait()
        restored, _ = ckpt.restore(target)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(64.0))


def test_missing_sharding_is_rejected(tmp_path):
    state = make_state(make_mesh({"data": -1}))
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state)
        with pytest.raises(ValueError, match="without a sharding"):
            ckpt.restore(abstract(state, lambda x: None))


def make_iterator():
    return iter(grain.MapDataset.range(64).shuffle(seed=3).batch(4).to_iter_dataset())


def test_grain_iterator_resumes(tmp_path):
    state = make_state(make_mesh({"data": -1}))
    it = make_iterator()
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(3, state, it)
        expected = [next(it) for _ in range(2)]  # advancing after save must not leak into it
        ckpt.wait()
    fresh = make_iterator()
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.restore(abstract(state), fresh)
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)


def test_incomplete_latest_checkpoint_is_skipped(tmp_path):
    state = make_state(make_mesh({"data": -1}))
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(2, state)
    (tmp_path / "4" / "state").mkdir(parents=True)  # no commit marker
    (tmp_path / "4" / "state" / "junk").write_text("partial")
    (tmp_path / "5.orbax-checkpoint-tmp-123").mkdir()  # an interrupted orbax write
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 2
        restored, _ = ckpt.restore(abstract(state))
        assert_same(restored, state)
        assert ckpt.save(4, state)  # the junk dir no longer blocks this step
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
    assert any(p.name.startswith("4.incomplete-") for p in tmp_path.iterdir())


TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from m2omni_jax.parallel.sharding import make_mesh
    from m2omni_jax.training.checkpointing import Checkpointer, StopSignal

    mesh = make_mesh({"data": -1})
    sharding = NamedSharding(mesh, P("data"))
    state = {"w": jax.device_put(jnp.arange(16.0), sharding), "step": jnp.int32(0)}
    update = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1})
    ckpt = Checkpointer(sys.argv[1], save_every=1000, keep=2)
    with StopSignal() as stop:
        for step in range(1, 10**6):
            state = update(state)
            ckpt.save(step, state)
            if step == 3:
                print("ready", flush=True)
            if stop.should_stop(step):
                ckpt.save(step, state, extra={"stopped_by": stop.signum}, force=True)
                ckpt.wait()
                print("saved", step, flush=True)
                break
            time.sleep(0.005)
    ckpt.close()
""")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    step = int(out.split()[-1])
    assert step >= 3

    mesh = make_mesh({"data": -1})
    target = {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
    with Checkpointer(tmp_path / "ckpt", save_every=1000, keep=2) as ckpt:
        assert ckpt.latest_step() == step
        restored, extra = ckpt.restore(target)
    assert int(restored["step"]) == step
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16.0) + step)
    assert extra == {"stopped_by": int(signal.SIGTERM)}


def test_stop_signal_flag_and_restore_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.should_stop(1)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.should_stop(2) and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_load_params_reads_only_params_and_names_new_leaves(tmp_path):
    import optax
    from m2omni_jax.training.checkpointing import load_params
    from m2omni_jax.training.train_step import TrainState

    params = {"llm": {"w": jnp.arange(4.0)}, "vision": {"v": jnp.ones(3)}}
    tx = optax.adam(1e-3)
    state = TrainState(step=jnp.array(3), params=params, opt_state=tx.init(params),
                       rng=jnp.zeros(2, jnp.uint32), tx=tx)
    ckpt = Checkpointer(tmp_path / "prev" / "checkpoints", save_every=1, keep=1)
    ckpt.save(3, state, force=True)
    ckpt.close()

    mesh = make_mesh({"data": -1})
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = {"llm": {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=rep)},
                "vision": {"v": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=rep)},  # resized
                "audio": {"a": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep)}}  # new tower
    loaded, missing = load_params(tmp_path / "prev", abstract)
    np.testing.assert_array_equal(loaded["llm"]["w"], np.arange(4.0))
    assert loaded["llm"]["w"].sharding == rep
    assert sorted(missing) == ["audio/a", "vision/v"]
    assert "vision" not in loaded and "audio" not in loaded
    # `include` reads only the matching paths (a tower pre-trained beside a smaller LLM).
    loaded, missing = load_params(tmp_path / "prev", abstract, include=("^vision/",))
    assert loaded == {} and sorted(missing) == ["audio/a", "llm/w", "vision/v"]
    abstract["vision"]["v"] = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=rep)
    loaded, missing = load_params(tmp_path / "prev", abstract, include=("^vision/",))
    assert list(loaded) == ["vision"] and sorted(missing) == ["audio/a", "llm/w"]
    np.testing.assert_array_equal(loaded["vision"]["v"], np.ones(3))
