"""Step balance weights, calibration file, baseline samplers, dynamic adaptive balance."""
import collections
import json

import jax
import numpy as np
import pytest

from m2omni_jax.modalities import MODALITIES, NUM_MODALITIES, modality_id
from m2omni_jax.training import balance


# --------------------------------------------------------------------------- step balance

def test_step_balance_weights_known_example():
    # 1/L* = (0.5, 1, 0.25), sum 1.75 -> w = 10·(0.5, 1, 0.25)/1.75
    w = balance.step_balance_weights({"text": 2.0, "image": 1.0, "audio": 4.0}, alpha=10.0)
    assert w == pytest.approx({"text": 10 * 0.5 / 1.75, "image": 10 / 1.75,
                               "audio": 10 * 0.25 / 1.75})
    assert sum(w.values()) == pytest.approx(10.0)
    arr = balance.step_balance_weights(np.array([2.0, 1.0, 4.0]))
    np.testing.assert_allclose(arr, [2.857142857, 5.714285714, 1.428571429], rtol=1e-8)


def test_step_balance_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown modality"):
        balance.step_balance_weights({"smell": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        balance.step_balance_weights(np.array([1.0, 0.0]))


def test_modality_vector_fills_absent():
    v = balance.modality_vector({"image": 3.0}, fill=0.0)
    assert v.shape == (NUM_MODALITIES,) and v[modality_id("image")] == 3.0 and v.sum() == 3.0


def test_calibration_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "calib" / "losses.json")
    balance.save_calibration(path, {"text": 2.25, "audio": 3.5})
    assert balance.load_calibration(path) == {"text": 2.25, "audio": 3.5}
    with pytest.raises(FileNotFoundError, match="calibration"):
        balance.load_calibration(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                        ('{"smell": 1.0}', "unknown modality"), ('{"text": -1}', "finite number")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            balance.load_calibration(str(bad))


def test_calibration_file_holds_convergence_and_old_flat_files_still_load(tmp_path):
    path = str(tmp_path / "losses.json")
    balance.save_calibration(path, {"text": 2.25}, {"slope_per_step": {"text": -0.001}})
    data = json.loads(open(path).read())
    assert data == {"converged_losses": {"text": 2.25}, "convergence": {"slope_per_step": {"text": -0.001}}}
    assert balance.load_calibration(path) == {"text": 2.25}
    flat = tmp_path / "flat.json"
    flat.write_text('{"text": 2.0, "image": 1.5}')
    assert balance.load_calibration(str(flat)) == {"text": 2.0, "image": 1.5}


def test_tail_convergence_is_the_tail_mean_and_flags_a_falling_curve():
    steps = list(range(1, 101))
    settled = [2.0 + 3.0 * np.exp(-s / 5) for s in steps]  # flat well before the last 20 steps
    falling = [4.0 - 0.01 * s for s in steps]  # a straight line: still 0.19 down over the tail
    a = balance.tail_convergence(steps, settled, tail=20)
    b = balance.tail_convergence(steps, falling, tail=20)
    assert a["converged_loss"] == pytest.approx(np.mean(settled[-20:]))
    assert abs(a["relative_change"]) < 1e-5
    assert b["converged_loss"] == pytest.approx(4.0 - 0.01 * 90.5)
    assert b["slope_per_step"] == pytest.approx(-0.01)
    assert b["relative_change"] == pytest.approx(-0.19 / 3.095)
    assert balance.unconverged({"image": a, "text": b}, max_change=0.02) == ["text"]
    with pytest.raises(ValueError, match="shorter than --tail=20"):
        balance.tail_convergence(steps[:10], settled[:10], tail=20)


def test_calibration_tail_is_at_most_half_the_run():
    balance.check_calibration_tail(steps=20, tail=10)
    for steps, tail in ((20, 11), (100, 1)):
        with pytest.raises(ValueError, match=f"--tail={tail} .*--steps"):
            balance.check_calibration_tail(steps, tail)


def test_round_robin_and_size_proportional():
    rr = balance.round_robin(["text", "image", "audio"])
    assert [rr(i) for i in range(5)] == ["text", "image", "audio", "text", "image"]
    pick = balance.size_proportional_sampler({"text": 700, "image": 200, "audio": 100}, seed=3)
    counts = collections.Counter(pick(i) for i in range(3000))
    assert counts["text"] / 3000 == pytest.approx(0.7, abs=0.04)
    assert counts["audio"] / 3000 == pytest.approx(0.1, abs=0.03)
    again = balance.size_proportional_sampler({"text": 700, "image": 200, "audio": 100}, seed=3)
    assert [again(i) for i in range(100, 120)] == [pick(i) for i in range(100, 120)]


# --------------------------------------------------------------------------- dynamic adaptive

def _reference_weights(window_losses, f):
    """The paper's arithmetic, written independently in float64 numpy."""
    L = np.asarray(window_losses, np.float64)  # (H, M)
    H, M = L.shape
    floor = np.minimum(L.min(0), 1e-6)  # the paper's min{min_w, ε}
    Ln = (L - floor) / (L.max(0) - floor)
    a = np.array([np.polyfit(np.arange(H), Ln[:, i], 1)[0] for i in range(M)])
    a_t = M * a / np.abs(a).sum()
    soft = lambda z: np.exp(z) / np.exp(z).sum()
    s = soft(a_t) * (-a_t)
    return M * soft(f * s)


CURVES = {  # 6 validation passes each
    "text": [5.0, 4.0, 3.0, 2.0, 1.5, 1.2],     # still falling
    "image": [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],    # flat
    "audio": [3.0, 2.0, 1.6, 1.5, 1.45, 1.44],  # flattening
}


def _run_passes(bal, n):
    state = bal.init()
    for t in range(n):
        state = bal.update(state, {m: CURVES[m][t] for m in bal.modalities})
    return state


def test_first_window_passes_are_all_ones():
    bal = balance.AdaptiveBalance(("text", "image", "audio"), window=4, temperature=2.0)
    state = bal.init()
    for t in range(4):
        state = bal.update(state, {m: CURVES[m][t] for m in bal.modalities})
        np.testing.assert_array_equal(state["weights"], 1.0)
        np.testing.assert_array_equal(state["raw_weights"], 1.0)


def test_two_modality_hand_computed():
    # window 4 at pass 5: text [4,3,2,1.5] -> L~ ≈ L/4 = [1, .75, .5, .375]: slope -0.2125;
    # image flat: L~ = 1, slope 0.
    # a~ = 2·a/Σ|a| = (-2, 0); softmax(a~) = (e^-2, 1)/(1+e^-2) = (0.119203, 0.880797)
    # s = (2·0.119203, 0) = (0.238406, 0); w = 2·softmax(s) = (1.118642, 0.881358)  (f = 1)
    # w~ = 0.9·1 + 0.1·w = (1.011864, 0.988136)
    bal = balance.AdaptiveBalance(("text", "image"), window=4, temperature=1.0)
    state = _run_passes(bal, 5)
    np.testing.assert_allclose(state["raw_weights"], [1.118642, 0.881358], rtol=1e-5)
    np.testing.assert_allclose(state["weights"], [1.0118642, 0.9881358], rtol=1e-6)


def test_matches_reference_and_falling_modality_gains():
    bal = balance.AdaptiveBalance(("text", "image", "audio"), window=4, temperature=2.0)
    state = _run_passes(bal, 6)
    L = np.array([CURVES[m] for m in bal.modalities]).T  # (passes, M)
    w5, w6 = _reference_weights(L[1:5], 2.0), _reference_weights(L[2:6], 2.0)
    np.testing.assert_allclose(state["raw_weights"], w6, rtol=1e-5)
    np.testing.assert_allclose(state["weights"], 0.9 * (0.9 + 0.1 * w5) + 0.1 * w6, rtol=1e-5)
    assert float(state["raw_weights"].sum()) == pytest.approx(3.0, rel=1e-6)
    text, image, audio = np.asarray(state["raw_weights"])
    # Falling modalities gain on the flat one. sᵢ = softmax(ã)ᵢ·(−ãᵢ) is not monotone in the
    # slope (here text's steep ã ≈ −2.57 earns less than audio's gentle −0.43), so the two
    # falling modalities are not ordered.
    assert min(text, audio) > 1.0 > image


def test_noisy_plateau_stays_flat():
    # Text falls 3.0 -> 1.85 while image sits at 2.0 with N(0, 0.004) noise. Scaled by its own
    # max, image's slope is ~0 whatever the noise, so text's weight barely moves between draws
    # (measured 1.113-1.126); min-max scaling stretched the noise to [0, 1] (1.00-1.46).
    bal = balance.AdaptiveBalance(("text", "image"), window=8, temperature=1.0)
    text = np.linspace(3.0, 1.85, 8)
    weights = []
    for seed in range(20):
        image = 2.0 + np.random.default_rng(seed).normal(0.0, 0.004, 8)
        history = np.stack([text, image], axis=1).astype(np.float32)
        raw = np.asarray(bal.raw_weights(history))
        np.testing.assert_allclose(raw, _reference_weights(history, 1.0), rtol=1e-4)
        weights.append(raw[0])
    assert 1.11 < min(weights) and max(weights) < 1.13


def test_update_is_jittable_and_state_round_trips_exactly():
    bal = balance.AdaptiveBalance(("text", "image", "audio"), window=3, temperature=1.5)
    update = jax.jit(bal.update)
    state = bal.init()
    for t in range(4):
        state = update(state, np.array([CURVES[m][t] for m in bal.modalities], np.float32))
    restored = balance.state_from_json(balance.state_to_json(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for k in state:
        np.testing.assert_array_equal(restored[k], state[k])
        assert restored[k].dtype == state[k].dtype
    a = bal.update(state, {m: CURVES[m][4] for m in bal.modalities})
    b = bal.update(restored, {m: CURVES[m][4] for m in bal.modalities})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_weights_vector_unbalanced_modalities_keep_one():
    bal = balance.AdaptiveBalance(("text", "audio"), window=2)
    state = bal.init()
    for t in range(4):
        state = bal.update(state, {m: CURVES[m][t] for m in bal.modalities})
    vec = np.asarray(bal.weights_vector(state))
    assert vec.shape == (NUM_MODALITIES,)
    for name in MODALITIES:
        if name not in bal.modalities:
            assert vec[modality_id(name)] == 1.0
    np.testing.assert_array_equal(vec[[modality_id("text"), modality_id("audio")]],
                                  state["weights"])


def test_adaptive_config_errors():
    with pytest.raises(ValueError, match="window"):
        balance.AdaptiveBalance(("text",), window=1)
    with pytest.raises(ValueError, match="unknown modality"):
        balance.AdaptiveBalance(("smell",))
    bal = balance.AdaptiveBalance(("text", "image"), window=2)
    with pytest.raises(ValueError, match="missing"):
        bal.update(bal.init(), {"text": 1.0})


def test_adaptive_from_config():
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(modalities=("text", "audio"), window=3, temperature=2.0,
                                         momentum=0.8, eps=1e-6))
    bal = balance.AdaptiveBalance.from_config(cfg)
    assert (bal.modalities, bal.window, bal.temperature, bal.momentum) == (
        ("text", "audio"), 3, 2.0, 0.8)
