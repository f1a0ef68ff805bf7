"""Train state, the loss, and the jitted, explicitly sharded train step.

The loss is next-token cross-entropy on output tokens only. Every token
carries a modality tag; the step takes a per-modality weight vector
(`loss_weights`, length NUM_MODALITIES) so balance strategies change the
weights, never the step. With all weights 1 the loss is the plain mean over
trained tokens:  loss = Σₜ w[modₜ]·maskₜ·ceₜ / Σₜ maskₜ.
The mask may weight tokens (`config.data.loss_averaging`, see data/pipeline.py:
a sample's tokens get n^-p); the reported per-modality sums and counts are unweighted.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2omni_jax.data.pipeline import BATCH_KEYS  # the text batch's keys, defined where batches are made
from m2omni_jax.modalities import MODALITY_ID, NUM_MODALITIES
from m2omni_jax.models import moe, omni
from m2omni_jax.parallel import sharding
from m2omni_jax.training import balance_optax

# Extra inputs of the omni model (models/omni.py), passed through when a batch has them.
MEDIA_KEYS = omni.MEDIA_KEYS
IMAGE_OUT = MODALITY_ID["image_out"]  # the image head's flow-matching loss, weighted as a modality
_BATCH_NDIM = {"positions": 3, "vision_patches": 3, "vision_hw": 3, "gen_image": 5,  # every other key: (B, T)
               "audio_features": 4}


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so it checkpoints like any array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def cross_entropy_terms(logits, targets):
    """Per-token cross-entropy and log-partition (for z-loss), in fp32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def weighted_loss(ce, log_z, batch, loss_weights, z_loss_weight: float):
    """Scalar training loss plus per-modality sums/counts for reporting."""
    mask = batch["loss_mask"].astype(jnp.float32)
    trained = (mask > 0).astype(jnp.float32)
    modality_one_hot = jax.nn.one_hot(batch["modality"], NUM_MODALITIES, dtype=jnp.float32) * trained[..., None]
    token_weights = jnp.asarray(loss_weights, jnp.float32)[batch["modality"]]
    num_tokens = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(ce * mask * token_weights) / num_tokens
    z_loss = z_loss_weight * jnp.sum(jnp.square(log_z) * mask) / num_tokens
    metrics = {
        "ce_sum": jnp.einsum("bt,btm->m", ce, modality_one_hot),
        "token_count": modality_one_hot.sum((0, 1)),
        "z_loss": z_loss,
    }
    return loss + z_loss, metrics


def model_inputs(batch) -> dict:
    """The model's keyword inputs: tokens, positions (3,B,T), segment ids, and any media keys."""
    inputs = {"tokens": batch["tokens"]}
    if "positions" in batch:
        inputs["positions"] = jnp.moveaxis(batch["positions"], 1, 0)  # (B,3,T) -> (3,B,T)
    if "segment_ids" in batch:
        inputs["segment_ids"] = batch["segment_ids"]
    inputs.update({k: batch[k] for k in MEDIA_KEYS if k in batch})
    return inputs


def chunked_cross_entropy_terms(hidden, targets, head: Callable, chunk: int):
    """`cross_entropy_terms(head(hidden), targets)` without the whole (B, T, vocab) logits:
    a scan over `chunk` positions at a time, each chunk's logits rematerialised in the
    backward pass (T is padded to a multiple of `chunk`; the padding is dropped)."""
    batch, length, width = hidden.shape
    pad = -length % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    chunks = (length + pad) // chunk
    xs = (jnp.moveaxis(hidden.reshape(batch, chunks, chunk, width), 1, 0),
          jnp.moveaxis(targets.reshape(batch, chunks, chunk), 1, 0))
    terms = jax.checkpoint(lambda h, t: cross_entropy_terms(head(h), t))
    _, (ce, log_z) = jax.lax.scan(lambda carry, x: (carry, terms(*x)), None, xs)
    whole = lambda a: jnp.moveaxis(a, 0, 1).reshape(batch, chunks * chunk)[:, :length]  # noqa: E731
    return whole(ce), whole(log_z)


def _lm_head(module, hidden):
    """The LM head of an LLM or of an omni model's LLM (a `method` for `model.apply`)."""
    return getattr(module, "llm", module).head(hidden)


def token_losses(params, batch, model: nn.Module, rngs=None):
    """(per-token cross-entropy, log-partition, intermediates). With the LLM's
    `lm_head_chunk` > 0 the head runs chunk by chunk: the model's whole logits are then
    unused, so jit never computes them."""
    chunk = getattr(model.config, "llm", model.config).lm_head_chunk
    (logits, hidden), intermediates = model.apply({"params": params}, **model_inputs(batch), return_hidden=True,
                                                  mutable=["intermediates"], rngs=rngs or {})
    if not chunk:
        return (*cross_entropy_terms(logits, batch["targets"]), intermediates)
    head = lambda h: model.apply({"params": params}, h, method=_lm_head)  # noqa: E731
    return (*chunked_cross_entropy_terms(hidden, batch["targets"], head, chunk), intermediates)


def loss_fn(params, batch, loss_weights, *, model: nn.Module, z_loss_weight: float, rng=None):
    """rng: the image head's noise and times (a batch with gen_image; None: a fixed key) and
    the dropout masks (None: no dropout, as in evaluation)."""
    rngs = {} if rng is None else {"image_head": rng, "dropout": jax.random.fold_in(rng, 1)}
    ce, log_z, intermediates = token_losses(params, batch, model, rngs)
    loss, metrics = weighted_loss(ce, log_z, batch, loss_weights, z_loss_weight)
    loss, metrics = add_image_loss(loss, metrics, intermediates, loss_weights)
    aux = jnp.asarray(moe.moe_aux_loss(intermediates), jnp.float32)  # 0 for dense models
    return loss + aux, dict(metrics, moe_aux_loss=aux)


def add_image_loss(loss, metrics, intermediates, loss_weights):
    """+ w["image_out"]·(the image head's flow-matching loss), reported as modality "image_out"
    (its sum over the valid drawings and their count), when the model sowed one."""
    sown = intermediates.get("intermediates", {})
    if "image_flow_loss" not in sown:
        return loss, metrics
    flow, count = sown["image_flow_loss"][0], sown["image_count"][0]
    i = IMAGE_OUT
    metrics = dict(metrics, ce_sum=metrics["ce_sum"].at[i].add(flow * count),
                   token_count=metrics["token_count"].at[i].add(count))
    return loss + jnp.asarray(loss_weights, jnp.float32)[i] * flow, metrics


def train_step(state: TrainState, batch, loss_weights, *, model, z_loss_weight: float = 0.0, frozen=None):
    """frozen: a tree of bools like the params (optimizers.frozen_mask); frozen leaves get no
    backward pass (their gradient is zero, and grad_norm counts the trainable leaves only)."""
    # The image head's noise: a function of the run's key and the step, so a resumed run draws the same.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss = functools.partial(loss_fn, model=model, z_loss_weight=z_loss_weight, rng=rng)
    if frozen is not None:
        loss = without_gradient_through(frozen, loss)
    loss_weights = loss_weights * balance_optax.loss_weights(state.opt_state)  # the dynamic balance's (or 1)
    (loss, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, loss_weights)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def skip_nonfinite(step: Callable) -> Callable:
    """`step(state, ...) -> (state, metrics)` that keeps the state before a step whose loss or
    gradient norm is not finite (only the step counter moves on, past its batch) and adds
    metrics["finite"] for the loop to count (training/loop.py). Inside the jitted step, so
    the donated state is never needed again; a finite step's state is bitwise unchanged."""
    def guarded(state, *args):
        new_state, metrics = step(state, *args)
        # The new parameters too: a finite gradient times a huge learning rate can overflow.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & all_finite(new_state.params)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return kept.replace(step=new_state.step), dict(metrics, finite=finite)
    return guarded


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite everywhere."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def without_gradient_through(frozen, loss):
    """`loss` with frozen leaves behind stop_gradient, so XLA drops their backward pass
    (a frozen vision tower's, for one)."""
    def wrapped(params, *args, **kwargs):
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        return loss(params, *args, **kwargs)
    return wrapped


# --------------------------------------------------------------------------
# Sharded construction
# --------------------------------------------------------------------------

def example_inputs(example_batch_shapes: dict, inputs: Callable = model_inputs) -> dict:
    """Zero model inputs from {key: shape (int32) or jax.ShapeDtypeStruct}; `inputs` maps a
    batch to the model's keyword arguments."""
    def zeros(spec):
        if isinstance(spec, jax.ShapeDtypeStruct):
            return jnp.zeros(spec.shape, spec.dtype)
        return jnp.zeros(spec, jnp.int32)
    return inputs({k: zeros(v) for k, v in example_batch_shapes.items()})


def abstract_boxed_params(model: nn.Module, example_batch_shapes: dict, inputs: Callable = model_inputs) -> Any:
    """Parameter shapes with their logical-axis boxes, without allocating."""
    def init(rng):
        return model.init(rng, **example_inputs(example_batch_shapes, inputs))["params"]
    return jax.eval_shape(init, jax.random.key(0))


def state_shardings(model, tx, mesh: Mesh, rules, example_batch_shapes,
                    inputs: Callable = model_inputs) -> tuple[Any, Any]:
    """(abstract TrainState, its NamedShardings) from the params' logical axes.

    Optimizer-state leaves that mirror a parameter get that parameter's
    sharding (optax keeps the tree structure); scalars are replicated.
    """
    boxed = abstract_boxed_params(model, example_batch_shapes, inputs)
    param_shardings = sharding.logical_to_mesh_sharding(boxed, mesh, rules)
    params = nn.unbox(boxed)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optimizer_state_shardings(opt_state, params, param_shardings, mesh)
    rep = sharding.replicated(mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32), tx=tx)
    shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep, tx=tx)
    return abstract, shardings


def optimizer_state_shardings(opt_state, params, param_shardings, mesh):
    """Shard each optimizer leaf like the parameter it mirrors (same tree path suffix)."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[_path_key(path)] = s
    param_shapes = {_path_key(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        key = _path_key(path)
        for param_key, s in by_path.items():
            if key.endswith(param_key) and param_shapes[param_key] == leaf.shape:
                return s
        return sharding.replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _path_key(path) -> str:
    """'/'-joined keys of a jax key path, e.g. "1/inner_states/default/inner_state/0/mu/llm/embedding"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def create_train_state(model, tx, mesh, rules, example_batch_shapes, seed: int,
                       inputs: Callable = model_inputs):
    """Initialises parameters directly into their shardings (no host copy)."""
    abstract, shardings = state_shardings(model, tx, mesh, rules, example_batch_shapes, inputs)

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = nn.unbox(model.init(init_rng, **example_inputs(example_batch_shapes, inputs))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(state_rng), tx=tx)

    with sharding.activate(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, abstract, shardings


def batch_shardings(mesh: Mesh, keys=BATCH_KEYS) -> dict[str, NamedSharding]:
    return {k: sharding.batch_sharding(mesh, _BATCH_NDIM.get(k, 2)) for k in keys}


def jit_loss_step(loss: Callable, mesh, rules, shardings, batch_ndim: dict[str, int]) -> Callable:
    """A training step for any `loss(params, batch, rng) -> (loss, metrics)` (the tower's, the
    speech tokenizer's): jitted with explicit shardings, the state donated, non-finite steps
    skipped; `rng` is the run's key folded with the step, so a resumed run draws the same."""
    @skip_nonfinite
    def step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, rng)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), dict(metrics, loss=value, grad_norm=optax.global_norm(grads))
    in_batch = {k: sharding.batch_sharding(mesh, n) for k, n in batch_ndim.items()}
    jitted = jax.jit(step, in_shardings=(shardings, in_batch), out_shardings=(shardings, NamedSharding(mesh, P())),
                     donate_argnums=(0,))

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)
    return run


def jit_train_step(model, mesh, rules, shardings, *, z_loss_weight: float = 0.0,
                   batch_keys=BATCH_KEYS, frozen=None) -> Callable:
    """The train step under jit with explicit in/out shardings; the state is donated."""
    step = skip_nonfinite(functools.partial(train_step, model=model, z_loss_weight=z_loss_weight, frozen=frozen))
    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(shardings, batch_shardings(mesh, batch_keys), rep),
                     out_shardings=(shardings, rep), donate_argnums=(0,))

    def run(state, batch, loss_weights):
        with sharding.activate(mesh, rules):
            return jitted(state, batch, loss_weights)
    run.jitted = jitted
    return run
