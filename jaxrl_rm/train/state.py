"""Train state, optimizer, and the one jitted update step every trainer uses.

The train state is a plain pytree `{"params", "opt_state", "step", "rng"}` (params as a pure dict,
so orbax and shardings see ordinary nested dicts); the model's `graphdef` is static. A trainer
supplies a loss function

    loss_fn(model, batch) -> (loss_sum, denominator, metric_sums)

returning *sums* and a denominator, so that gradient accumulation over micro-batches computes
exactly the full-batch loss: loss = Σ loss_sum / Σ denominator (grads likewise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_rm.parallel.rules import param_shardings, strided_row_blocks

LossFn = Callable[[Any, dict], tuple[jax.Array, jax.Array, Any]]


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Warmup then constant / cosine / linear decay to `end_lr_fraction * learning_rate`."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(total_steps - warm, 1)
    end = lr * cfg.end_lr_fraction
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_fraction)
    else:
        after = optax.linear_schedule(lr, end, decay_steps)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the configured schedule and global-norm clipping (`cfg`: OptimConfig)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params, shardings, mesh):
    """Shardings of `optimizer.init(params)`: every parameter-shaped leaf (Adam's moments) placed
    like its parameter, the rest (step counts) replicated. Left to XLA, `init`'s zeros depend on
    no input, so nothing carries the parameters' sharding to them and each chip would hold the
    whole optimizer state (2x a float32 model per chip under FSDP).

    params: pytree of arrays or `ShapeDtypeStruct`s; shardings: the same tree of `NamedSharding`s."""
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, shardings,
                                 transform_non_params=lambda _: replicated)


@dataclasses.dataclass
class Trainer:
    """Holds what is static about a training run: model graph, optimizer, mesh, jitted step."""

    graphdef: Any
    optimizer: optax.GradientTransformation
    mesh: Any
    state_sharding: Any = None

    def init_state(self, model, seed: int) -> dict:
        """Split `model`, place params and a fresh optimizer state on the mesh."""
        _, params = nnx.split(model)
        params = nnx.to_pure_dict(params)
        shardings = param_shardings(params, self.mesh)
        params = jax.device_put(params, shardings)
        opt_state = jax.jit(self.optimizer.init, out_shardings=optimizer_state_shardings(
            self.optimizer, params, shardings, self.mesh))(params)
        replicated = NamedSharding(self.mesh, P())
        scalars = jax.device_put({"step": jnp.zeros((), jnp.int32),
                                  "rng": jax.random.key_data(jax.random.key(seed))}, replicated)
        state = {"params": params, "opt_state": opt_state, **scalars}
        # Commit every leaf to a mesh sharding so that the first and later steps (whose inputs
        # are the jitted outputs) see identical input shardings: one compilation, not two.
        self.state_sharding = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
        return jax.device_put(state, self.state_sharding)

    def model(self, state_or_params) -> nnx.Module:
        params = state_or_params.get("params", state_or_params)
        return nnx.merge(self.graphdef, params)


def inject_faults(batch: dict, step: int, nan_steps) -> dict:
    """Add the `poison` rows (`[B]` float32: NaN at `nan_steps`, else 0) that `build_train_step`
    folds into the loss; a no-op unless fault injection is configured."""
    if not nan_steps:
        return batch
    rows = len(next(iter(batch.values())))
    return {**batch, "poison": np.full(rows, np.nan if step in nan_steps else 0.0, np.float32)}


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target of a checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _combine_aux(stacked):
    """Reduce per-micro-batch aux stacked on a leading axis (sum, or the aux's own rule)."""
    if hasattr(stacked, "sum_leading_axis"):
        return stacked.sum_leading_axis()
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


def _finalize_metrics(aux, denom) -> dict:
    """Metric sums -> metrics: the aux's own `metrics()` (e.g. `LossTerms`), else sum / denominator."""
    if hasattr(aux, "metrics"):
        return dict(aux.metrics())
    return {k: v / denom for k, v in aux.items()}


def build_train_step(trainer: Trainer, loss_fn: LossFn, *, micro_batches: int = 1):
    """Jitted `step(state, batch) -> (state, metrics)`; state donated.

    `loss_fn(model, batch) -> (loss_sum, denominator, aux)`; aux is a dict of metric sums
    (reported as sum / denominator) or an object with `sum_leading_axis()` and `metrics()`
    (`jaxrl_rm.objectives.LossTerms`). The batch (dict of `[B, ...]` arrays) is split into
    `micro_batches` strided row sets (rows j, j+m, ...) and scanned: loss sums, denominators and
    gradients are summed, then divided once, so accumulation equals the full batch exactly. A
    step whose loss or gradient is non-finite leaves params and optimizer state untouched
    (`metrics["skipped"] = 1`).
    """
    graphdef, optimizer = trainer.graphdef, trainer.optimizer

    def sums(params, batch):
        batch = dict(batch)
        poison = batch.pop("poison", None)
        loss_sum, denom, aux = loss_fn(nnx.merge(graphdef, params), batch)
        if poison is not None:  # fault injection (debug.nan_steps): NaN loss *and* gradients
            loss_sum = loss_sum * (1.0 + jnp.sum(poison))
        return loss_sum, (denom, aux)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def step(state, batch):
        params = state["params"]
        split = strided_row_blocks(batch, micro_batches)  # every chip keeps its own rows

        def body(carry, micro):
            (l, (d, aux)), g = grad_fn(params, micro)
            loss_sum, denom, grads = carry
            return (loss_sum + l, denom + d, jax.tree.map(jnp.add, grads, g)), aux

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, denom, grads), stacked_aux = jax.lax.scan(body, zeros, split)
        aux = _combine_aux(stacked_aux)
        denom = jnp.maximum(denom, 1e-8)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics = _finalize_metrics(aux, denom)
        metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,), out_shardings=(trainer.state_sharding, None))


def build_eval_step(trainer: Trainer, loss_fn: LossFn):
    """Jitted `eval(params, batch) -> (loss_sum, denominator, metric_sums)`."""
    graphdef = trainer.graphdef

    def evaluate(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch)

    return jax.jit(evaluate)


def export_hf(trainer: Trainer, params, path, tokenizer=None) -> None:
    """Write params as an HF directory (`models.hf.save_model`) — collective: every process must
    call it (sharded params are gathered), process 0 writes."""
    from jaxrl_rm.models.hf import save_model
    from jaxrl_rm.parallel.mesh import fetch_global

    params = fetch_global(params)
    if jax.process_index() == 0:
        save_model(trainer.model(params), path, tokenizer=tokenizer)
