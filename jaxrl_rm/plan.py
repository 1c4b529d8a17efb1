"""Will this config fit that TPU slice? `python -m jaxrl_rm.main --config X --plan v5p:2x2x2`.

The planner builds every model of the config *abstractly* (shapes only: `model.path` may be a
folder holding nothing but an HF `config.json`), places the weights, optimizer state and
batches on the config's `(data, fsdp, tensor)` mesh over the chips of a TPU topology, and
compiles, with the real TPU compiler (libtpu, `jaxrl_rm.parallel.aot`), each jitted program the
pipeline would run — the same functions the trainers jit, not a model of them:

  sft           train step (forward, backward, optimizer, micro-batching)
  rm_bt, polar  train step on chosen + rejected rows
  grpo          rollout (sampler prefill + decode for prompts x G), the old / reference
                log-prob pass, the update step, and the scoring of every model-backed reward
                (`bt_rm` / `polar_rm` forward, `judge` / `self_judge` generation)
  judge_j1      the judge's format warm-up (an SFT step) and its GRPO run
  pipeline      every stage, in order

Per step it reports, per chip: arguments, outputs, XLA's temporaries, and the peak — the
weights and optimizer states that live through the whole phase (policy train state, reference
copy, reward models, judges: "resident") plus the step's own transient arguments, temporaries
and outputs (donated outputs counted once) — against the chip's HBM, with compile time and the
collectives in the HLO. A step that does not fit is named with its shortfall and the command
exits 1. Nothing is allocated, downloaded or run. `--plan-steps PATTERN,...` (fnmatch patterns
on the step names of the table, e.g. `grpo/train_step` or `*/rollout`) compiles only those steps:
one step of a 7B recipe takes minutes to compile on a CPU host.
"""

from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import functools
import json
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_rm.parallel import aot
from jaxrl_rm.parallel.rules import batch_shards, kv_head_axis

GIB = 2**30


def fmt_bytes(n: float) -> str:
    """1536 MiB -> "1.50 GiB"; below a GiB in MiB (tiny test models stay readable)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# --- abstract models and placed shapes ------------------------------------------------------
def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of placed `ShapeDtypeStruct`s (the largest shard of each
    leaf: replicated leaves count whole)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            continue  # static arguments
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def model_config(spec, *, polar: bool = False):
    """The architecture a `ModelSpec` names: `path`'s config.json (no weights read), or the
    random-init fields sized to the tokenizer (+ POLAR's two special tokens). A real model's
    padded vocabulary already has room for those (`models.resize`), so its config is taken as is."""
    from jaxrl_rm.models.hf import config_from_hf

    if spec.path:
        config_file = Path(spec.path) / "config.json"
        if not config_file.exists():
            from jaxrl_rm.configlib import ConfigError

            raise ConfigError(f"model.path: {spec.path} has no config.json (the planner needs the architecture)")
        return config_from_hf(json.loads(config_file.read_text()), source=str(config_file))
    from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
    from jaxrl_rm.models.factory import model_config_from_spec

    tokenizer = load_or_build_tokenizer(spec.tokenizer)
    if polar:
        from jaxrl_rm.models.resize import add_special_tokens
        from jaxrl_rm.rewards.scalar_rm import POLAR_SPECIAL_TOKENS

        add_special_tokens(tokenizer, POLAR_SPECIAL_TOKENS)
    return model_config_from_spec(spec, tokenizer)


def abstract_model(spec, *, reward: bool = False, polar: bool = False, config=None):
    """`nnx.eval_shape` of the model a run would build (Transformer, or RewardModel with
    `reward`), in the spec's dtypes and layer layout: shapes only, nothing allocated."""
    from jaxrl_rm.models.config import as_dtype
    from jaxrl_rm.models.factory import layout_kwargs
    from jaxrl_rm.models.reward import RewardModel
    from jaxrl_rm.models.transformer import Transformer

    config = config or model_config(spec, polar=polar)
    kw = dict(dtype=as_dtype(spec.dtype), param_dtype=as_dtype(spec.param_dtype), **layout_kwargs(spec))
    if reward:
        def build():
            backbone = Transformer(config, rngs=nnx.Rngs(0), with_lm_head=False, **kw)
            return RewardModel(config, rngs=nnx.Rngs(0), backbone=backbone)
    else:
        def build():
            return Transformer(config, rngs=nnx.Rngs(0), **kw)
    return nnx.eval_shape(build)


def placed_params(model, mesh):
    """The model's weights as a pure dict of `ShapeDtypeStruct`s placed by the sharding rules."""
    from jaxrl_rm.parallel.rules import param_shardings

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shardings = param_shardings(params, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)


def placed_train_state(params, optimizer, mesh) -> dict:
    """`Trainer.init_state`'s pytree, abstract: params, the optimizer state placed as the trainer
    places it (`optimizer_state_shardings`), step and rng replicated."""
    from jaxrl_rm.train.state import optimizer_state_shardings

    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(optimizer.init, params),
                             optimizer_state_shardings(optimizer, params, shardings, mesh))
    return {"params": params, "opt_state": opt_state,
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}


def batch_structs(mesh, **shapes) -> dict:
    """name -> (shape, dtype) => `ShapeDtypeStruct`s with rows over (data, fsdp), like `shard_batch`."""
    from jaxrl_rm.parallel.rules import batch_sharding

    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


# set by `plan(..., compile=False)` for the duration of one planning call
_LOWER_ONLY = contextvars.ContextVar("jaxrl_rm_plan_lower_only", default=False)
# set by `plan(..., steps=...)`: fnmatch patterns of the step names to compile (None: all)
_STEPS = contextvars.ContextVar("jaxrl_rm_plan_steps", default=None)

#: the note of a step `plan(compile=False)` only lowered (its temporaries are unknown)
LOWERED_ONLY = "lowered only: no temporaries"

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def hbm_requirement(message: str, argument_bytes: int) -> int | None:
    """Per-chip bytes XLA:TPU said it needed when it refused to compile (RESOURCE_EXHAUSTED):
    arguments + its count of temporaries; None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
    if m:
        return argument_bytes + int(float(m.group(1)) * _UNITS[m.group(2)])
    m = re.search(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", message)
    if m:
        return max(int(float(m.group(1)) * _UNITS[m.group(2)]), argument_bytes)
    return None


def compile_step(phase, name: str, fn, *args, resident_args: int, **kwargs) -> None:
    """Compile `fn` for the placed `args` and add it to `phase`. A program too large for the
    chip's HBM is refused by the TPU compiler; it is recorded with the size the compiler asked
    for (arguments + temporaries), so the plan reports it as a shortfall instead of crashing.
    A step that `plan(steps=...)` leaves out is skipped."""
    patterns = _STEPS.get()
    if patterns is not None and not any(fnmatch.fnmatchcase(f"{phase.name}/{name}", p) for p in patterns):
        return
    t0 = time.perf_counter()
    if _LOWER_ONLY.get():
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        jitted.lower(*args, **kwargs)
        report = aot.CompileReport(temp_bytes=0, argument_bytes=per_chip_bytes(args), output_bytes=0, alias_bytes=0,
                                   generated_code_bytes=0, compile_seconds=time.perf_counter() - t0,
                                   collectives={}, all_gather_shapes=())
        phase.steps.append(PlannedStep(phase.name, name, report, resident_args, LOWERED_ONLY))
        return
    try:
        report, note = aot.compile_report(fn, *args, **kwargs), ""
    except jax.errors.JaxRuntimeError as e:
        arguments = per_chip_bytes(args)
        need = hbm_requirement(str(e), arguments)
        if need is None:
            raise
        report = aot.CompileReport(temp_bytes=need - arguments, argument_bytes=arguments, output_bytes=0,
                                   alias_bytes=0, generated_code_bytes=0,
                                   compile_seconds=time.perf_counter() - t0, collectives={},
                                   all_gather_shapes=())
        note = "refused by the TPU compiler: out of HBM"
    phase.steps.append(PlannedStep(phase.name, name, report, resident_args, note))


def compile_train_step(phase, mesh, graphdef, state, loss_fn, batch, *, micro_batches: int, optimizer) -> None:
    """Compile `build_train_step`'s jitted update for the placed `state` and `batch`."""
    from jaxrl_rm.train.state import Trainer, build_train_step

    trainer = Trainer(graphdef, optimizer, mesh,
                      state_sharding=jax.tree.map(lambda x: x.sharding, state))
    compile_step(phase, "train_step", build_train_step(trainer, loss_fn, micro_batches=micro_batches),
                 state, batch, resident_args=per_chip_bytes(state))


# --- the plan -------------------------------------------------------------------------------
@dataclasses.dataclass
class PlannedStep:
    """One compiled program. `resident_args`: per-chip bytes of its arguments that are resident
    anyway (the weights / train state it reads), so they are not counted twice."""

    phase: str
    name: str
    report: aot.CompileReport
    resident_args: int
    note: str = ""
    kv: dict | None = None  # sampling steps: `kv_cache_per_chip`

    def peak(self, resident: int) -> int:
        r = self.report
        transient_args = max(r.argument_bytes - self.resident_args, 0)
        return resident + transient_args + r.temp_bytes + max(r.output_bytes - r.alias_bytes, 0)


@dataclasses.dataclass
class Phase:
    """Steps that run while the same weights are resident (e.g. a GRPO run: policy train state,
    reference copy, reward models)."""

    name: str
    residents: dict  # what -> per-chip bytes
    steps: list = dataclasses.field(default_factory=list)

    @property
    def resident(self) -> int:
        return sum(self.residents.values())


@dataclasses.dataclass
class Plan:
    topology: str
    mesh_shape: dict
    hbm_bytes: int
    phases: list

    def rows(self) -> list[dict]:
        out = []
        for ph in self.phases:
            for st in ph.steps:
                r, peak = st.report, st.peak(ph.resident)
                out.append({"step": f"{ph.name}/{st.name}", "arguments_gib": r.argument_bytes / GIB,
                            "outputs_gib": r.output_bytes / GIB, "temp_gib": r.temp_bytes / GIB,
                            "resident_gib": ph.resident / GIB, "peak_gib": peak / GIB,
                            "fits": peak <= self.hbm_bytes, "compile_s": r.compile_seconds,
                            "collectives": r.collectives, "note": st.note})
                if st.kv is not None and st.note != LOWERED_ONLY:
                    # rows whose caches fit beside the resident weights and the step's other memory
                    # (its peak minus its own cache): what bounds prompts x samples per step
                    other = peak - st.kv["bytes"]
                    out[-1]["kv_cache_gib"] = st.kv["bytes"] / GIB
                    out[-1]["kv_rows_per_chip"] = st.kv["rows_per_chip"]
                    out[-1]["kv_dtype"] = st.kv["dtype"]
                    out[-1]["kv_unit"] = st.kv.get("unit", "sample rows")
                    out[-1]["kv_max_rows_per_chip"] = max(int((self.hbm_bytes - other) // st.kv["row_bytes"]), 0)
        return out

    def shortfalls(self) -> list[str]:
        return [f"step {row['step']} needs {row['peak_gib']:.2f} GiB per chip; a {self.generation} chip "
                f"has {self.hbm_bytes / GIB:.0f} GiB HBM: short by {row['peak_gib'] - self.hbm_bytes / GIB:.2f} GiB"
                for row in self.rows() if not row["fits"]]

    @property
    def generation(self) -> str:
        return aot.tpu_generation(self.topology)

    def table(self) -> str:
        head = (f"plan for {self.topology} ({math.prod(self.mesh_shape.values())} chips, mesh "
                + " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items())
                + f"; {self.hbm_bytes / GIB:.0f} GiB HBM per chip), per chip:")
        lines = [head, "", "| step | arguments | outputs | temp | resident | peak | fits | compile s "
                 "| collectives |", "|---|---|---|---|---|---|---|---|---|"]
        for row in self.rows():
            coll = ", ".join(f"{k} {v}" for k, v in sorted(row["collectives"].items())) or row["note"] or "-"
            size = lambda key: fmt_bytes(row[key] * GIB)
            lines.append(f"| {row['step']} | {size('arguments_gib')} | {size('outputs_gib')} | {size('temp_gib')} "
                         f"| {size('resident_gib')} | {size('peak_gib')} | {'yes' if row['fits'] else 'NO'} "
                         f"| {row['compile_s']:.1f} | {coll} |")
        lines.append("")
        for ph in self.phases:
            parts = "; ".join(f"{k} {fmt_bytes(v)}" for k, v in ph.residents.items())
            lines.append(f"resident in {ph.name}: {parts}")
        for row in self.rows():
            if "kv_cache_gib" in row:
                lines.append(f"KV cache of {row['step']}: {fmt_bytes(row['kv_cache_gib'] * GIB)} per chip "
                             f"({row['kv_rows_per_chip']} {row['kv_unit']}) in {row['kv_dtype']}; with the rest of the "
                             "step as planned, "
                             f"the chip's HBM holds the caches of {row['kv_max_rows_per_chip']} rows")
        return "\n".join(lines)

    def summary(self) -> dict:
        rows = self.rows()
        return {"task": "plan", "topology": self.topology, "mesh": self.mesh_shape,
                "hbm_gib": self.hbm_bytes / GIB, "fits": all(r["fits"] for r in rows),
                "max_peak_gib": max((r["peak_gib"] for r in rows), default=0.0),
                "steps": {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows},
                "shortfalls": self.shortfalls()}


# --- per task -------------------------------------------------------------------------------
def _optimizer(cfg, updates: int):
    from jaxrl_rm.train.state import make_optimizer

    return make_optimizer(cfg.optim, max(updates, 1))


def plan_sft(cfg, mesh, *, name: str = "sft", batch_size: int | None = None, steps: int | None = None) -> Phase:
    """An SFT run's train step: `[B, data.max_length]` rows, `next_token_loss`."""
    from jaxrl_rm.train.sft import next_token_loss

    model = abstract_model(cfg.model)
    params = placed_params(model, mesh)
    optimizer = _optimizer(cfg, steps or cfg.train.steps)
    state = placed_train_state(params, optimizer, mesh)
    b, t = batch_size or cfg.train.batch_size, cfg.data.max_length
    shapes = {"input_ids": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
              "loss_mask": ((b, t), jnp.bool_)}
    if cfg.data.packing:
        shapes.update(segment_ids=((b, t), jnp.int32), positions=((b, t), jnp.int32))
    phase = Phase(name, {"train state (params + optimizer)": per_chip_bytes(state)})
    compile_train_step(phase, mesh, nnx.split(model)[0], state, functools.partial(next_token_loss, mesh=mesh),
                       batch_structs(mesh, **shapes), micro_batches=cfg.train.micro_batches, optimizer=optimizer)
    return phase


def plan_reward_model(cfg, mesh) -> Phase:
    """rm_bt / polar_*: the pairwise train step on `[B, data.max_length]` chosen and rejected rows."""
    from jaxrl_rm.train.reward_model import pairwise_rm_loss

    polar = cfg.task.startswith("polar")
    model = abstract_model(cfg.model, reward=True, polar=polar)
    params = placed_params(model, mesh)
    optimizer = _optimizer(cfg, cfg.train.steps)
    state = placed_train_state(params, optimizer, mesh)
    b, t = cfg.train.batch_size, cfg.data.max_length
    shapes = {"valid": ((b,), jnp.bool_)}
    for side in ("chosen", "rejected"):
        shapes.update({f"{side}_input_ids": ((b, t), jnp.int32), f"{side}_attention_mask": ((b, t), jnp.int32),
                       f"{side}_score_index": ((b,), jnp.int32)})
    loss = pairwise_rm_loss(margin=cfg.rm.margin, center_coef=cfg.rm.center_coef)
    phase = Phase(cfg.task, {"train state (params + optimizer)": per_chip_bytes(state)})
    compile_train_step(phase, mesh, nnx.split(model)[0], state, loss, batch_structs(mesh, **shapes),
                       micro_batches=cfg.train.micro_batches, optimizer=optimizer)
    return phase


def _generate_step(phase, name, model, params, mesh, *, prompts, prompt_len, num_samples, max_new_tokens,
                   top_k=0, top_p=1.0, greedy=False, unfiltered=False, kv_cache_dtype=None):
    from jaxrl_rm.sampling.sampler import generate_program

    fn, args, kwargs = generate_program(model, params, prompts=prompts, prompt_len=prompt_len,
                                        num_samples=num_samples, max_new_tokens=max_new_tokens, mesh=mesh,
                                        top_k=top_k, top_p=top_p, greedy=greedy, unfiltered=unfiltered,
                                        kv_cache_dtype=kv_cache_dtype)
    compile_step(phase, name, fn, *args, resident_args=per_chip_bytes(params), **kwargs)
    if phase.steps and phase.steps[-1].name == name:  # (not skipped by `steps=`)
        prompt_ids, spec = args[3], kwargs["spec"]  # `[rows, P]` in the bucketed shapes it compiles
        phase.steps[-1].kv = kv_cache_per_chip(model, mesh, rows=prompt_ids.shape[0] * num_samples,
                                               slots=prompt_ids.shape[1] + spec.gen_len, dtype=kv_cache_dtype)


def _slot_engine_step(phase, name, model, params, mesh, *, rows, num_samples, prompt_len, max_new_tokens,
                      num_slots=0, top_k=0, top_p=1.0, kv_cache_dtype=None):
    """The slot engine's decode program (`rollout.SlotEngine` with the run's mesh: a slot group
    per data shard) for `rows` samples, with the slot counts `RolloutCollector` would choose. Its
    KV line counts the sample slots on a chip; one more sample slot costs its completion cache plus
    1/G of a prompt slot."""
    from jaxrl_rm.models.transformer import kv_cache_dtype_name, kv_slot_bytes
    from jaxrl_rm.rollout import step as step_mod
    from jaxrl_rm.sampling.sampler import _stop_slots

    groups = batch_shards(mesh)
    slots = max(num_slots or 1 << max(rows - 1, 0).bit_length(), groups)
    prompt_slots = -(-max(1, slots // num_samples) // groups)
    per_group = -(-slots // groups)
    spec = step_mod.EngineSpec(
        num_slots=per_group, num_prompt_slots=prompt_slots, prompt_len=prompt_len, gen_len=max_new_tokens,
        prefill_rows=min(4, prompt_slots), top_k=top_k, use_top_p=top_p < 1.0, greedy=False,
        num_stop_slots=_stop_slots(1), pad_id=0, kv_cache_dtype=kv_cache_dtype_name(kv_cache_dtype))
    fn, args, kwargs = step_mod.decode_groups_program(model, params, spec, groups, mesh)
    compile_step(phase, name, fn, *args, resident_args=per_chip_bytes(params), **kwargs)
    if phase.steps and phase.steps[-1].name == name:
        slot_bytes = kv_slot_bytes(model.config, kv_cache_dtype, model.dtype, heads=_kv_heads_per_chip(model, mesh))
        per_chip = slot_bytes * (per_group * max_new_tokens + prompt_slots * prompt_len)
        phase.steps[-1].kv = {"bytes": per_chip, "row_bytes": slot_bytes * (max_new_tokens + prompt_len / num_samples),
                              "rows_per_chip": per_group, "slots": prompt_len + max_new_tokens,
                              "unit": f"sample slots, {prompt_slots} prompt slots",
                              "dtype": kv_cache_dtype_name(kv_cache_dtype) or jnp.dtype(model.dtype).name}


def _kv_heads_per_chip(model, mesh) -> int:
    """KV heads a chip holds: split over `tensor` when it divides them (`parallel.rules.kv_head_axis`)."""
    kv = model.config.num_key_value_heads
    return kv // mesh.shape["tensor"] if kv_head_axis(mesh, kv) else kv


def kv_cache_per_chip(model, mesh, *, rows: int, slots: int, dtype=None) -> dict:
    """The sampler's KV cache on one chip: `rows` sample rows (sharded over data x fsdp) of `slots`
    positions, K and V for every layer, heads split over `tensor` when they divide it, in `dtype`
    (None / "compute": the model's compute dtype; "int8": 1 byte per element plus a float32 scale
    per (token, head), `models.transformer.kv_slot_bytes`) -> {bytes, row_bytes (one row on its
    chip), rows_per_chip, slots, dtype (its name)}."""
    from jaxrl_rm.models.transformer import kv_cache_dtype_name, kv_slot_bytes

    row_bytes = kv_slot_bytes(model.config, dtype, model.dtype, heads=_kv_heads_per_chip(model, mesh)) * slots
    per_chip = -(-rows // batch_shards(mesh))
    name = kv_cache_dtype_name(dtype) or jnp.dtype(model.dtype).name
    return {"bytes": per_chip * row_bytes, "row_bytes": row_bytes, "rows_per_chip": per_chip, "slots": slots,
            "dtype": name}


def plan_grpo(cfg, mesh, *, name: str = "grpo", exports: dict | None = None) -> Phase:
    """A GRPO run: rollout, old / reference log-probs, update, and model-backed reward scoring."""
    from jaxrl_rm.train.grpo import completion_logprobs_in_chunks, make_grpo_loss, mismatch_correction

    g = cfg.grpo
    model = abstract_model(cfg.model)
    graphdef = nnx.split(model)[0]
    params = placed_params(model, mesh)
    optimizer = _optimizer(cfg, cfg.train.steps * g.ppo_epochs * g.mini_batches)
    state = placed_train_state(params, optimizer, mesh)
    phase = Phase(name, {"policy train state (params + optimizer)": per_chip_bytes(state)})
    if g.kl_coef > 0:
        phase.residents["reference params"] = per_chip_bytes(params)
    p, t = g.max_prompt_length, g.max_new_tokens
    n_rollout = g.prompts_per_step * g.num_samples
    if g.rollout_engine == "slots":
        _slot_engine_step(phase, "rollout", model, params, mesh, rows=n_rollout, num_samples=g.num_samples,
                          prompt_len=p, max_new_tokens=t, num_slots=g.rollout_slots, top_k=g.top_k, top_p=g.top_p,
                          kv_cache_dtype=g.kv_cache_dtype)
    else:
        _generate_step(phase, "rollout", model, params, mesh, prompts=g.prompts_per_step, prompt_len=p,
                       num_samples=g.num_samples, max_new_tokens=t, top_k=g.top_k, top_p=g.top_p, unfiltered=True,
                       kv_cache_dtype=g.kv_cache_dtype)

    def rows(n):
        return {"input_ids": ((n, p + t), jnp.int32), "attention_mask": ((n, p + t), jnp.int32),
                "completion": ((n, t), jnp.int32), "loss_mask": ((n, t), jnp.bool_),
                "old_logp": ((n, t), jnp.float32), "advantages": ((n,), jnp.float32),
                "sampler_logp": ((n, t), jnp.float32)}

    reuse_sampler_logp = g.ppo_epochs * g.mini_batches == 1 and not mismatch_correction(g)
    if not reuse_sampler_logp or g.kl_coef > 0:
        logp = jax.jit(lambda prm, batch: completion_logprobs_in_chunks(
            nnx.merge(graphdef, prm), batch, chunks=g.mini_batches * cfg.train.micro_batches, prompt_len=p,
            temperature=g.temperature, mesh=mesh))
        compile_step(phase, "old_and_ref_logp", logp, params, batch_structs(mesh, **rows(n_rollout)),
                     resident_args=per_chip_bytes(params))
    batch = rows(n_rollout // g.mini_batches)
    if g.kl_coef > 0:
        batch["ref_logp"] = ((n_rollout // g.mini_batches, t), jnp.float32)
    compile_train_step(phase, mesh, graphdef, state, make_grpo_loss(g, prompt_len=p, mesh=mesh),
                       batch_structs(mesh, **batch), micro_batches=cfg.train.micro_batches, optimizer=optimizer)
    for task in g.tasks:
        for r in task.rewards:
            _plan_reward_source(phase, cfg, mesh, task, r, policy=(model, params), n_rollout=n_rollout,
                                exports=exports or {})
    return phase


#: ModelSpec fields that say which architecture a model has (the rest: how a run computes with it)
ARCHITECTURE_FIELDS = ("path", "tokenizer", "model_type", "hidden_size", "intermediate_size",
                       "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def spec_at(path: str, default, exports: dict):
    """`default` (a ModelSpec: dtypes, layer layout) for the model at `path`, whose architecture is
    an earlier pipeline stage's export (`exports`: the spec of the run that writes it), else the
    config.json in `path`."""
    exported = exports.get(str(Path(path).resolve())) if path else None
    if exported is None:
        return dataclasses.replace(default, path=path)
    return dataclasses.replace(default, **{f: getattr(exported, f) for f in ARCHITECTURE_FIELDS})


def _plan_reward_source(phase, cfg, mesh, task, r, *, policy, n_rollout: int, exports: dict,
                        label: str | None = None) -> None:
    """The scoring program of one model-backed reward (rule rewards run on the host); an
    ensemble's members each, labelled `<ensemble name>/m<i>`."""
    g, opts = cfg.grpo, dict(r.options)
    label = label or opts.get("name", r.type)
    if r.type == "ensemble":
        from jaxrl_rm.config import RewardSpec

        for i, m in enumerate(opts.get("members") or []):
            member = RewardSpec(type=m["type"], path=m.get("path", ""), options=dict(m.get("options") or {}))
            _plan_reward_source(phase, cfg, mesh, task, member, policy=policy, n_rollout=n_rollout,
                                exports=exports, label=f"{label}/m{i}")
    elif r.type in ("bt_rm", "polar_rm"):
        from jaxrl_rm.configlib import ConfigError

        if not r.path:
            raise ConfigError(f"grpo.tasks[{task.name}].rewards: {r.type} needs `path`")
        model = abstract_model(spec_at(r.path, cfg.model, exports), reward=True,
                               polar=r.type == "polar_rm")
        params = placed_params(model, mesh)
        phase.residents[f"{label} params"] = per_chip_bytes(params)
        graphdef = nnx.split(model)[0]
        b, length = int(opts.get("batch_size", 32)), int(opts.get("max_length", 1024))

        def forward(prm, ids, mask, index):
            return nnx.merge(graphdef, prm)(ids, mask, score_index=index).astype(jnp.float32)

        args = batch_structs(mesh, ids=((b, length), jnp.int32), mask=((b, length), jnp.int32),
                             index=((b,), jnp.int32))
        compile_step(phase, f"score/{label}", jax.jit(forward), params, args["ids"], args["mask"], args["index"],
                     resident_args=per_chip_bytes(params))
    elif r.type in ("judge", "self_judge"):
        if r.type == "judge":
            model = abstract_model(spec_at(r.path, cfg.model, exports))
            params = placed_params(model, mesh)
            phase.residents[f"{label} params"] = per_chip_bytes(params)
        else:
            model, params = policy
        max_new = int(opts.get("max_new_tokens", 256))
        prompt_len = int(opts.get("max_prompt_length", g.max_prompt_length + g.max_new_tokens + 256))
        # pointwise judges see each rollout; list-wise / pairwise ones a group per prompt
        pointwise = opts.get("mode", "pointwise" if r.type == "judge" else "listwise") == "pointwise"
        prompts = min(int(opts.get("batch_size", 64)), n_rollout if pointwise else g.prompts_per_step)
        _generate_step(phase, f"score/{label}", model, params, mesh, prompts=prompts, prompt_len=prompt_len,
                       num_samples=int(opts.get("num_judgments", 1)), max_new_tokens=max_new,
                       top_k=int(opts.get("top_k", 0)), top_p=float(opts.get("top_p", 1.0)),
                       greedy=bool(opts.get("greedy", False)))


def judge_spec(cfg, exports: dict):
    """The judge a judge_j1 run trains: `judge.judge_init` (a directory), else `model.*` (also
    what `judge_init: policy` fine-tunes from)."""
    j = cfg.judge
    if j.judge_init and j.judge_init != "policy":
        return spec_at(j.judge_init, cfg.model, exports)
    return cfg.model


def plan_judge_j1(cfg, mesh, *, exports: dict | None = None) -> list[Phase]:
    """J1: the judge's format warm-up SFT (when `judge.warmup_steps` > 0), then GRPO of the judge."""
    j = cfg.judge
    spec = judge_spec(cfg, exports or {})
    phases = []
    if j.warmup_steps > 0:
        warm = dataclasses.replace(cfg, model=spec)
        phases.append(plan_sft(warm, mesh, name="judge_j1/warmup", batch_size=j.warmup_batch_size,
                               steps=j.warmup_steps))
    rl = dataclasses.replace(cfg, model=spec)
    phases.append(plan_grpo(rl, mesh, name="judge_j1/rl", exports=exports))
    return phases


def plan_config(cfg, mesh, *, prefix: str = "", exports: dict | None = None) -> list[Phase]:
    """Phases of one config (a pipeline: of each stage, names prefixed by the stage).

    exports: export directory -> the ModelSpec of the run that writes it. A pipeline stage that
    loads an earlier stage's export (`model.path={run_dir}/sft/hf`) is planned with that stage's
    architecture, since the directory does not exist before the pipeline runs."""
    from jaxrl_rm.configlib import ConfigError

    exports = {} if exports is None else exports
    if cfg.task == "pipeline":
        from jaxrl_rm.train.pipeline import stage_config

        phases = []
        for stage in cfg.stages:
            phases += plan_config(stage_config(cfg, stage), mesh, prefix=f"{prefix}{stage.name}/", exports=exports)
        return phases
    if cfg.model.path:
        cfg = dataclasses.replace(cfg, model=spec_at(cfg.model.path, cfg.model, exports))
    trained = judge_spec(cfg, exports) if cfg.task == "judge_j1" else cfg.model
    # what this run exports (`<run_dir>/hf`), with the dtypes / layout of the run that reads it
    exports[str((Path(cfg.run_dir) / "hf").resolve())] = trained
    if cfg.task == "sft":
        phases = [plan_sft(cfg, mesh)]
    elif cfg.task in ("rm_bt", "polar_pretrain", "polar_finetune"):
        phases = [plan_reward_model(cfg, mesh)]
    elif cfg.task == "grpo":
        phases = [plan_grpo(cfg, mesh, exports=exports)]
    elif cfg.task == "judge_j1":
        phases = plan_judge_j1(cfg, mesh, exports=exports)
    else:
        raise ConfigError(f"task {cfg.task!r}: the planner covers sft, rm_bt, polar_pretrain, polar_finetune, "
                          "grpo, judge_j1 and pipelines of them")
    for ph in phases:
        ph.name = prefix + ph.name
    return phases


def plan(cfg, topology: str, *, compile: bool = True, steps: list[str] | None = None) -> Plan:
    """Compile every step of `cfg` for `topology` (e.g. "v5p:2x2x2") on the config's mesh.

    compile=False only lowers each step (traces it for the placed shapes: seconds, where a
    compile at real sizes takes minutes on a CPU host): shapes, shardings and the resident
    weights are checked, but the steps' temporaries are unknown (reported as 0).
    steps: fnmatch patterns of step names (`"grpo/train_step"`, `"*/rollout"`): only those are
    compiled and reported; a pattern that matches no step is a `ConfigError`."""
    from jaxrl_rm.parallel.mesh import make_mesh

    generation = aot.tpu_generation(topology)
    if generation not in aot.TPU_HBM_BYTES:
        from jaxrl_rm.configlib import ConfigError

        raise ConfigError(f"--plan {topology}: unknown TPU generation {generation!r}; "
                          f"known: {sorted(aot.TPU_HBM_BYTES)}")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=aot.tpu_devices(topology))
    tokens = _LOWER_ONLY.set(not compile), _STEPS.set(list(steps) if steps is not None else None)
    try:
        phases = plan_config(cfg, mesh)
    finally:
        _LOWER_ONLY.reset(tokens[0])
        _STEPS.reset(tokens[1])
    result = Plan(topology, dict(mesh.shape), aot.TPU_HBM_BYTES[generation], phases)
    planned = [row["step"] for row in result.rows()]
    for p in steps or ():
        if not any(fnmatch.fnmatchcase(name, p) for name in planned):
            from jaxrl_rm.configlib import ConfigError

            raise ConfigError(f"--plan-steps: {p!r} matches no step of this config")
    return result


def run_plan(cfg, topology: str, steps: list[str] | None = None) -> int:
    """The `--plan` command: print the table and a JSON summary; 0 when every step fits, else 1
    with each shortfall named on stderr."""
    import sys

    result = plan(cfg, topology, steps=steps)
    print(result.table(), flush=True)
    print(json.dumps(result.summary(), sort_keys=True, default=str))
    for line in result.shortfalls():
        print(f"plan: {line}", file=sys.stderr)
    return 0 if not result.shortfalls() else 1
