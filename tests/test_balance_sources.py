"""Balance batch sources stack/pick per-modality batches and resume exactly."""
import grain
import numpy as np

from m2omni_jax.data.balance_sources import PickedModalityBatches, StackedModalityBatches
from m2omni_jax.training import balance


def modality_iterator(offset: int):
    ds = grain.MapDataset.range(1000).map(lambda i: {"x": np.full((2, 3), i + offset, np.int32)})
    return iter(ds.to_iter_dataset())


def make_iterators():
    return {"text": modality_iterator(0), "image": modality_iterator(10_000), "video": modality_iterator(20_000)}


def test_stacked_batches_hold_one_batch_per_modality_in_order():
    it = StackedModalityBatches(make_iterators())
    first = next(it)["x"]
    assert first.shape == (3, 2, 3)
    np.testing.assert_array_equal(first[:, 0, 0], [0, 10_000, 20_000])


def test_stacked_state_resumes_exactly():
    it = StackedModalityBatches(make_iterators())
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it)["x"] for _ in range(3)]
    resumed = StackedModalityBatches(make_iterators())
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["x"], want)


def test_picked_batches_follow_the_sampler_and_resume():
    pick = balance.size_proportional_sampler({"text": 1, "image": 5, "video": 2}, seed=3)
    it = PickedModalityBatches(make_iterators(), pick)
    seen = [int(next(it)["x"][0, 0]) // 10_000 for _ in range(200)]
    counts = np.bincount(seen, minlength=3) / 200
    assert counts[1] > counts[2] > counts[0]  # ∝ sizes 5 : 2 : 1
    state = it.get_state()
    expected = [next(it)["x"] for _ in range(5)]
    resumed = PickedModalityBatches(make_iterators(), pick)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["x"], want)


def test_round_robin_cycles():
    it = PickedModalityBatches(make_iterators(), balance.round_robin(("text", "image", "video")))
    firsts = [int(next(it)["x"][0, 0]) for _ in range(6)]
    assert firsts == [0, 10_000, 20_000, 1, 10_001, 20_001]
