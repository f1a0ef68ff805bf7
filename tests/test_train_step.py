"""The loss: masked next-token CE, per-modality reporting, modality weights, z-loss."""
import jax
import jax.numpy as jnp
import numpy as np

from m2omni_jax.modalities import NUM_MODALITIES, modality_id
from m2omni_jax.training import train_step

TEXT, IMAGE = modality_id("text"), modality_id("image")


def example(seed=0, batch=2, length=6, vocab=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.float32)
    mask[0, :2] = 0  # a prompt
    mask[1, -1] = 0  # padding
    modality = np.full((batch, length), TEXT, np.int32)
    modality[1] = IMAGE
    return logits, targets, {"loss_mask": mask, "modality": modality}


def reference_ce(logits, targets):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


def test_loss_is_masked_mean_and_reported_per_modality():
    logits, targets, batch = example()
    ce, log_z = train_step.cross_entropy_terms(jnp.asarray(logits), jnp.asarray(targets))
    loss, metrics = train_step.weighted_loss(ce, log_z, batch, jnp.ones(NUM_MODALITIES), 0.0)
    ref = reference_ce(logits, targets)
    mask = batch["loss_mask"]
    np.testing.assert_allclose(loss, (ref * mask).sum() / mask.sum(), rtol=1e-6)
    per_modality = np.asarray(metrics["ce_sum"]) / np.maximum(np.asarray(metrics["token_count"]), 1)
    np.testing.assert_allclose(per_modality[TEXT], ref[0, 2:].mean(), rtol=1e-6)
    np.testing.assert_allclose(per_modality[IMAGE], ref[1, :-1].mean(), rtol=1e-6)
    assert np.asarray(metrics["token_count"])[TEXT] == 4 and np.asarray(metrics["token_count"])[IMAGE] == 5


def test_modality_weights_scale_only_their_tokens():
    logits, targets, batch = example()
    ce, log_z = train_step.cross_entropy_terms(jnp.asarray(logits), jnp.asarray(targets))
    weights = np.ones(NUM_MODALITIES, np.float32)
    weights[IMAGE] = 3.0
    loss, _ = train_step.weighted_loss(ce, log_z, batch, jnp.asarray(weights), 0.0)
    ref = reference_ce(logits, targets)
    expected = (ref[0, 2:].sum() + 3.0 * ref[1, :-1].sum()) / 9
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_weighted_mask_averages_samples_and_reports_unweighted_counts():
    logits, targets, batch = example()
    mask = batch["loss_mask"]
    per_sample = mask / mask.sum(1, keepdims=True)  # data.loss_averaging="sample": one sample per row
    ce, log_z = train_step.cross_entropy_terms(jnp.asarray(logits), jnp.asarray(targets))
    loss, metrics = train_step.weighted_loss(ce, log_z, {**batch, "loss_mask": per_sample},
                                             jnp.ones(NUM_MODALITIES), 0.0)
    ref = reference_ce(logits, targets)
    np.testing.assert_allclose(loss, (ref[0, 2:].mean() + ref[1, :-1].mean()) / 2, rtol=1e-6)
    assert np.asarray(metrics["token_count"])[TEXT] == 4 and np.asarray(metrics["token_count"])[IMAGE] == 5
    np.testing.assert_allclose(np.asarray(metrics["ce_sum"])[TEXT], ref[0, 2:].sum(), rtol=1e-6)


def test_z_loss_adds_mean_squared_log_partition():
    logits, targets, batch = example()
    ce, log_z = train_step.cross_entropy_terms(jnp.asarray(logits), jnp.asarray(targets))
    plain, _ = train_step.weighted_loss(ce, log_z, batch, jnp.ones(NUM_MODALITIES), 0.0)
    with_z, metrics = train_step.weighted_loss(ce, log_z, batch, jnp.ones(NUM_MODALITIES), 1e-2)
    lz = np.log(np.exp(logits).sum(-1))
    expected_z = 1e-2 * (lz ** 2 * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(with_z - plain, expected_z, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], expected_z, rtol=1e-5)


def test_masked_targets_get_no_gradient():
    logits, targets, batch = example()

    def loss(lg):
        ce, log_z = train_step.cross_entropy_terms(lg, jnp.asarray(targets))
        return train_step.weighted_loss(ce, log_z, batch, jnp.ones(NUM_MODALITIES), 1e-3)[0]
    grads = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert np.all(grads[0, :2] == 0) and np.all(grads[1, -1] == 0)
    assert np.all(np.abs(grads[0, 2:]).sum(-1) > 0)
