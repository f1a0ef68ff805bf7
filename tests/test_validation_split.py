"""The dynamic balance's validation records are held out of the training data: the last
Sᵢ·Bᵢ records of each training part, disjoint from what training reads and from the eval split."""
import grain
import ml_collections
import pytest

from configs import base
from m2omni_jax.data import sources


def _numbered(name, cfg, config):
    """A test source: per modality of `sizes`, records "<split>:<modality>:<i>"."""
    class Numbered(sources.Source):
        def parts(self, split):
            return {f"{name}_{m}": sources.Part(name, m, lambda n=n, m=m: grain.MapDataset.range(n).map(
                        lambda i, m=m: f"{split}:{m}:{i}")) for m, n in cfg.sizes.items()}
    return Numbered(name, cfg, config)


sources.register_source("test_numbered", _numbered)


def config_of(strategy, sizes=None, val_batches=2, val_batch_size=3):
    config = base.get_config()
    config.data.sources = ml_collections.ConfigDict({"numbered": dict(kind="test_numbered",
                                                                      sizes=sizes or {"text": 20, "image": 12})})
    config.balance.strategy = strategy
    config.balance.dynamic.val_batches, config.balance.dynamic.val_batch_size = val_batches, val_batch_size
    return config


def records(config, split):
    return {name: list(part.records()) for name, part in sources.parts(config, split).items()}


def test_validation_is_the_last_s_times_b_training_records_of_each_part():
    config = config_of("dynamic")  # S·B = 2·3 = 6 per part
    train, validation, evaluation = (records(config, s) for s in ("train", "validation", "eval"))
    assert validation["numbered_text"] == [f"train:text:{i}" for i in range(14, 20)]
    assert validation["numbered_image"] == [f"train:image:{i}" for i in range(6, 12)]
    for name in train:
        assert len(train[name]) + len(validation[name]) == {"numbered_text": 20, "numbered_image": 12}[name]
        assert not set(train[name]) & set(validation[name])
        assert not set(evaluation[name]) & set(validation[name])
    assert sources.validation_records(config) == 6


def test_other_strategies_train_on_everything_and_have_no_validation_split():
    config = config_of("none")
    assert len(records(config, "train")["numbered_text"]) == 20
    with pytest.raises(ValueError, match="only for the dynamic balance"):
        records(config, "validation")


def test_a_part_too_small_to_hold_out_from_is_a_clear_error():
    config = config_of("dynamic", sizes={"text": 20, "audio": 5})
    with pytest.raises(ValueError, match=r"part 'numbered_audio' .* has 5 training records; the dynamic balance "
                                         r"holds out 6"):
        records(config, "train")
