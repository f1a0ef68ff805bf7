"""train.py's balance set-up: step-balance weights from the config, the optimizer chain's clip,
size-proportional sampling by data-set size."""
import collections

import grain
import ml_collections
import numpy as np
import pytest

from configs import base
from m2omni_jax import faults, train
from m2omni_jax.data import sources
from m2omni_jax.training import balance
from m2omni_jax.config_fields import replace
from m2omni_jax.run_config import RunConfig


def step_config(**step):
    config = base.get_config()
    config.balance.strategy = "step"
    config.balance.modalities = ("text", "image")
    config.balance.step.update(step)
    return config


def test_step_balance_needs_a_calibration_file_or_explicit_equal_weights(tmp_path):
    # A ConfigError: the command exits 2 with this one line, before building anything.
    with pytest.raises(faults.ConfigError, match=r"balance\.step\.calibration_file.*balance\.step\.equal_weights=True"):
        train.step_balance_weights(step_config())
    with pytest.raises(faults.ConfigError, match=r"calibration_file='/no/such\.json': .*not found"):
        train.step_balance_weights(step_config(calibration_file="/no/such.json"))
    np.testing.assert_allclose(train.step_balance_weights(step_config(equal_weights=True)), [5.0, 5.0])
    path = str(tmp_path / "losses.json")
    balance.save_calibration(path, {"text": 2.0, "image": 1.0})
    np.testing.assert_allclose(train.step_balance_weights(step_config(calibration_file=path)),
                               [10 / 3, 20 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        train.step_balance_weights(step_config(calibration_file=path, equal_weights=True))


def test_step_balance_chain_does_not_clip_the_sum_again():
    config = RunConfig.of(step_config(equal_weights=True))
    chain = train.optimizer_chain_config(config)
    assert chain.opt.grad_clip == 0.0 and config.opt.grad_clip == 1.0  # the step clips the average
    config = replace(config, **{"balance.strategy": "none"})
    assert train.optimizer_chain_config(config) is config


def _sized_source(name, cfg, config):
    """A test source kind: one part per modality of `sizes`, that many records each."""
    class Sized(sources.Source):
        def parts(self, split):
            return {f"{name}_{m}": sources.Part(name, m, lambda n=n: grain.MapDataset.range(n))
                    for m, n in cfg.sizes.items()}
    return Sized(name, cfg, config)


sources.register_source("test_sized", _sized_source)


def test_size_proportional_samples_by_dataset_size_not_mixture_weight():
    config = base.get_config()
    config.balance.strategy = "size_proportional"
    config.data.sources = ml_collections.ConfigDict(dict(
        a=dict(kind="test_sized", sizes=dict(text=100, image=300)),
        b=dict(kind="test_sized", sizes=dict(image=300, video=0))))
    config.data.modality_weights = dict(text=0.9, image=0.1)  # must not matter
    sizes = train.dataset_sizes(config, ("text", "image"))
    assert sizes == {"text": 100, "image": 600}
    pick = balance.size_proportional_sampler(sizes, seed=0)
    share = collections.Counter(pick(i) for i in range(4000))["image"] / 4000
    assert share == pytest.approx(6 / 7, abs=0.02)
    with pytest.raises(ValueError, match=r"config\.balance\.modalities has \['video'\]"):
        train.dataset_sizes(config, ("text", "video"))


BALANCED_RUNS = {
    "dynamic": ["--config.balance.strategy=dynamic", "--config.balance.modalities=('text','image')",
                "--config.balance.dynamic.window=2", "--config.balance.dynamic.interval_steps=2",
                "--config.balance.dynamic.val_batches=1", "--config.balance.dynamic.val_batch_size=8"],
    "step": ["--config.balance.strategy=step", "--config.balance.modalities=('text','image')",
             "--config.balance.step.equal_weights=True"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(BALANCED_RUNS))
def test_a_balanced_run_resumes_exactly_with_its_state_in_the_optimizer(tmp_path, strategy):
    """8 steps straight = 4 steps, then a resume to 8 (the balance's state comes back with the
    optimizer state): the same losses bitwise, and for dynamic the same weights."""
    from test_train import losses, run, train_command
    from m2omni_jax.training.metrics_logging import read_metrics
    data = tmp_path / "data"
    extra = [*BALANCED_RUNS[strategy], "--config.checkpoint.every=4"]
    straight = run(train_command(tmp_path / "straight", data, "--config.train.steps=8", *extra), timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run(train_command(tmp_path / "resumed", data, "--config.train.steps=4", *extra), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(train_command(tmp_path / "resumed", data, "--config.train.steps=8", *extra), timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 4" in second.stderr
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 8
    if strategy == "dynamic":
        records = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("straight", "resumed")]
        weights = [{s: r[s].get("balance/weight/text") for s in (6, 8)} for r in records]
        assert weights[0] == weights[1] and weights[0][8] is not None and weights[0][8] != 1.0
