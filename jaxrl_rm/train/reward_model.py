"""Reward-model training: Bradley–Terry (task rm_bt) and POLAR (tasks polar_pretrain, polar_finetune).

All three stages are one pipeline — a scalar-head `RewardModel`, pairs of scored sequences, the
BT loss on their reward difference — and differ only in what a "pair" is:

| task | record | preferred sequence | other sequence | held-out metric |
|---|---|---|---|---|
| rm_bt | PreferencePair | p + chosen | p + rejected | eval_accuracy (+ per subset) |
| polar_pretrain | PolarQuad | (p, a1) ⟶ a2 | (p, a1) ⟶ b1 | policy_discrimination_accuracy |
| polar_finetune | RankedTriple | (p, ref) ⟶ chosen | (p, ref) ⟶ rejected | eval_accuracy |

where (p, ref) ⟶ c is the POLAR input `p + ref <|split|> p + c <|reward|>`
(`jaxrl_rm.rewards.scalar_rm.PolarInputBuilder`). Loss per pair: -log σ(r⁺ - r⁻ - margin)
[+ center_coef (r⁺ + r⁻)²] (`objectives.bradley_terry_loss_terms`), reduced as (sum, count) so
micro-batching is exact. Both sequences of a pair go through one forward pass (`[2B, T]`).

The RM starts from `model.path` (an HF causal LM: its backbone, lm_head dropped, new head; or an
HF reward model, e.g. a POLAR-pretrained one, as is) or from a random init of `model.*`. POLAR
stages add `<|split|>` / `<|reward|>` to the tokenizer and grow the embedding (new rows = mean
row, see `jaxrl_rm.models.resize`). Run directory: config.yaml, metrics.jsonl, tensorboard/,
checkpoints/ (orbax, resumable), summary.json (held-out accuracy before / after / gain), and
hf/ (the trained RM + tokenizer, `rm.export_hf`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.configlib import ConfigError
from jaxrl_rm.data.pipeline import BatchStream
from jaxrl_rm.data.records import PolarQuad, PreferencePair, RankedTriple
from jaxrl_rm.data.tokenizer import load_or_build_tokenizer, load_tokenizer
from jaxrl_rm.eval.reward_model import pairwise_accuracy
from jaxrl_rm.models.config import as_dtype
from jaxrl_rm.models.factory import check_tokenizer_fits, layout_kwargs, model_config_from_spec
from jaxrl_rm.models.resize import add_special_tokens, add_tokens_and_resize, reward_model_from_lm
from jaxrl_rm.models.reward import RewardModel
from jaxrl_rm.objectives.reward_model import bradley_terry_loss_terms
from jaxrl_rm.parallel.mesh import mesh_from_config
from jaxrl_rm.parallel.rules import shard_batch
from jaxrl_rm.rewards.scalar_rm import (POLAR_SPECIAL_TOKENS, BTInputBuilder, PolarInputBuilder, RewardScorer,
                                        pad_sequences)
from jaxrl_rm.train.loop import prepare_run_dir, summarize, train_loop, write_summary
from jaxrl_rm.train.state import Trainer, abstract_like, build_train_step, make_optimizer


@dataclasses.dataclass(frozen=True)
class Stage:
    record_type: type
    polar: bool
    metric_prefix: str


STAGES = {
    "rm_bt": Stage(PreferencePair, polar=False, metric_prefix="eval_"),
    "polar_pretrain": Stage(PolarQuad, polar=True, metric_prefix="policy_discrimination_"),
    "polar_finetune": Stage(RankedTriple, polar=True, metric_prefix="eval_"),
}


# --- data -------------------------------------------------------------------------------------
def load_rm_records(source: str, stage: Stage, cfg, *, split: str, key: str = "data.train"):
    """Records of `stage.record_type` from a source string (see `RMConfig`); -> (records, stats dict)."""
    from jaxrl_rm.data import synthetic
    from jaxrl_rm.data.loaders import load_alpaca_eval_triples, load_hh_rlhf, load_records

    name = synthetic.parse_source(source)
    if name is not None:
        if name not in synthetic.RM_TASKS:
            raise ConfigError(f"{key}: unknown synthetic reward-model task {name!r}; "
                              f"available: {sorted(synthetic.RM_TASKS)}")
        kind = synthetic.RM_TASKS[name][0]
        if kind != stage.record_type.__name__:
            raise ConfigError(f"{key}: synthetic:{name} makes {kind} records but this task trains on "
                              f"{stage.record_type.__name__}")
        n = cfg.data.synthetic_size if split == "train" else (cfg.rm.eval_size or max(cfg.data.synthetic_size // 8, 64))
        return synthetic.rm_records(name, n, seed=cfg.seed, split=split), {}
    on_bad_row = cfg.data.on_bad_row
    if source.startswith("hh_rlhf:"):
        if stage.record_type is not PreferencePair:
            raise ConfigError(f"{key}: hh_rlhf sources give preference pairs (task rm_bt), not "
                              f"{stage.record_type.__name__}")
        path = source[len("hh_rlhf:"):]
        stem = Path(path).name.split(".")[0]
        records, stats = load_hh_rlhf(path, on_bad_row=on_bad_row, subset=stem)
        return records, stats.as_metrics()
    if source.startswith("alpaca_eval:"):
        d = Path(source[len("alpaca_eval:"):])
        triples, stats = load_alpaca_eval_triples(d / "outputs.jsonl.gz", d / "annotations.jsonl.gz",
                                                  min_gap=cfg.rm.alpaca_min_gap, on_bad_row=on_bad_row)
        if stage.record_type is RankedTriple:
            return triples, stats.as_metrics()
        if stage.record_type is PreferencePair:  # the traditional RM: the same pairs, no reference
            return [PreferencePair(prompt=t.prompt, chosen=t.chosen, rejected=t.rejected, id=t.id)
                    for t in triples], stats.as_metrics()
        raise ConfigError(f"{key}: alpaca_eval sources give ranked triples or pairs, not PolarQuad")
    field_map = {cfg.data.prompt_field: "prompt"} if cfg.data.prompt_field != "prompt" else None
    records, stats = load_records(source, stage.record_type, on_bad_row=on_bad_row, field_map=field_map)
    return records, stats.as_metrics()


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else repr([sorted(m.items()) for m in prompt])


def split_by_prompt(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): every record of a prompt lands on the same side; a prompt is held out
    when a seeded hash of it falls below `fraction` (stable under reordering and file growth)."""
    if fraction <= 0:
        return list(records), []
    train, held = [], []
    for r in records:
        h = hashlib.sha256(f"{seed}\x00{_prompt_key(r.prompt)}".encode()).digest()
        (held if int.from_bytes(h[:8], "big") / 2 ** 64 < fraction else train).append(r)
    return train, held


def subsample(records: list, n: int, seed: int) -> list:
    """At most `n` records (0 = all): a seeded subset in the original order."""
    if n <= 0 or len(records) <= n:
        return list(records)
    idx = np.sort(np.random.default_rng([seed, 29]).choice(len(records), size=n, replace=False))
    return [records[i] for i in idx]


def make_builder(stage: Stage, tokenizer, cfg):
    if stage.polar:
        return PolarInputBuilder(tokenizer, cfg.data.max_length, chat_template=cfg.data.chat_template,
                                 append_eos=cfg.rm.append_eos, min_prompt_tokens=cfg.rm.min_prompt_tokens)
    return BTInputBuilder(tokenizer, cfg.data.max_length, chat_template=cfg.data.chat_template,
                          append_eos=cfg.rm.append_eos)


def pair_sequences(records: list, builder) -> tuple[list, list]:
    """Records -> (preferred sequences, other sequences), each a list of (ids, head index)."""
    if not records:
        return [], []
    r0 = records[0]
    if isinstance(r0, PreferencePair):
        prompts = [r.prompt for r in records]
        return (builder.build_many(prompts, [r.chosen for r in records]),
                builder.build_many(prompts, [r.rejected for r in records]))
    if isinstance(r0, PolarQuad):
        prompts, refs = [r.prompt for r in records], [r.a1 for r in records]
        return (builder.build_many(prompts, refs, [r.a2 for r in records]),
                builder.build_many(prompts, refs, [r.b1 for r in records]))
    prompts, refs = [r.prompt for r in records], [r.reference for r in records]
    return (builder.build_many(prompts, refs, [r.chosen for r in records]),
            builder.build_many(prompts, refs, [r.rejected for r in records]))


def pair_rows(chosen: list, rejected: list, *, length: int, pad_id: int) -> dict:
    """Padded pair arrays: `{chosen,rejected}_{input_ids,attention_mask}` `[N, length]`,
    `{chosen,rejected}_score_index` `[N]` int32, `valid` `[N]` bool (right padding)."""
    out = {}
    for side, seqs in (("chosen", chosen), ("rejected", rejected)):
        rows = pad_sequences(seqs, length=length, pad_id=pad_id)
        out.update({f"{side}_{k}": v for k, v in rows.items()})
    out["valid"] = np.ones((len(chosen),), bool)
    return out


# --- loss -------------------------------------------------------------------------------------
def pairwise_rm_loss(*, margin: float = 0.0, center_coef: float = 0.0):
    """`loss_fn(model, batch) -> (loss_sum, n_pairs, metric_sums)` for `build_train_step`.

    batch: `pair_rows` arrays; both sides run through the model as one `[2B, T]` batch, and the
    head reads `score_index`. Metric sums (bt_loss, accuracy, margin_mean, reward_mean, ...) are
    over valid pairs, so `sum / n_pairs` is their mean.
    """

    def loss_fn(model, batch):
        b = batch["chosen_input_ids"].shape[0]
        ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        index = jnp.concatenate([batch["chosen_score_index"], batch["rejected_score_index"]])
        r = model(ids, mask, score_index=index)
        terms = bradley_terry_loss_terms(r[:b], r[b:], margin=margin if margin else None,
                                         center_coef=center_coef, mask=batch["valid"])
        return terms.loss_sum, terms.denominator, {k: s for k, (s, _) in terms.means.items()}

    return loss_fn


# --- model ------------------------------------------------------------------------------------
def build_reward_model(spec, tokenizer, *, seed: int = 0, polar: bool = False) -> RewardModel:
    """The RM a config asks for (see module docstring). With `polar`, `<|split|>` / `<|reward|>`
    are added to `tokenizer` (in place) and the embedding grown to fit."""
    dtype, param_dtype = as_dtype(spec.dtype), as_dtype(spec.param_dtype)
    if spec.path:
        from jaxrl_rm.models.hf import load_model

        model = reward_model_from_lm(load_model(spec.path, dtype=dtype, param_dtype=param_dtype,
                                                **layout_kwargs(spec)), seed=seed)
        if polar:
            add_tokens_and_resize(model, tokenizer, POLAR_SPECIAL_TOKENS)
    else:
        if polar:
            add_special_tokens(tokenizer, POLAR_SPECIAL_TOKENS)
        model = RewardModel(model_config_from_spec(spec, tokenizer), dtype=dtype, param_dtype=param_dtype,
                            rngs=nnx.Rngs(seed), **layout_kwargs(spec))
    check_tokenizer_fits(model.config, tokenizer, source=spec.path or "model")
    return model


def export_hf(model, tokenizer, path) -> Path:
    """Write an RM (gathered to host) + tokenizer as an HF directory (process 0 only)."""
    from jaxrl_rm.models.hf import save_model

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        graphdef, state = nnx.split(model)
        state = multihost_utils.process_allgather(state, tiled=True)
        model = nnx.merge(graphdef, state)
    if jax.process_index() == 0:
        save_model(model, path, tokenizer=tokenizer)
    return Path(path)


# --- pipeline ---------------------------------------------------------------------------------
def load_rm_tokenizer(path: str):
    """The built-in character tokenizer (empty path) or a directory's tokenizer exactly as saved
    (`data.tokenizer.load_tokenizer`: an exported RM's tokenizer sits beside its config.json)."""
    return load_tokenizer(path) if path else load_or_build_tokenizer("")


def run_reward_model(cfg) -> dict:
    """Train per `cfg` (task rm_bt | polar_pretrain | polar_finetune); returns the summary."""
    stage = STAGES[cfg.task]
    for key in ("path", "tokenizer"):
        value = getattr(cfg.model, key)
        if value and not Path(value).is_dir():
            raise ConfigError(f"model.{key}: {value!r} is not a directory (an HF model directory, e.g. the hf/ "
                              "export of an earlier run; empty = random init)")
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_rm_tokenizer(cfg.model.tokenizer or cfg.model.path)
    model = build_reward_model(cfg.model, tokenizer, seed=cfg.seed, polar=stage.polar)
    mesh = mesh_from_config(cfg.mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    train_records, stats = load_rm_records(cfg.data.train, stage, cfg, split="train")
    if cfg.data.eval:
        eval_records, _ = load_rm_records(cfg.data.eval, stage, cfg, split="eval", key="data.eval")
    elif cfg.data.train.startswith("synthetic:"):
        eval_records, _ = load_rm_records(cfg.data.train, stage, cfg, split="eval")
    else:
        train_records, eval_records = split_by_prompt(train_records, cfg.rm.eval_fraction, cfg.seed)
    eval_records = subsample(eval_records, cfg.rm.eval_size, cfg.seed)
    if not train_records:
        raise ConfigError(f"data.train: no training records in {cfg.data.train!r}")

    builder = make_builder(stage, tokenizer, cfg)
    chosen, rejected = pair_sequences(train_records, builder)
    rows = pair_rows(chosen, rejected, length=cfg.data.max_length, pad_id=pad_id)
    used = np.maximum(rows["chosen_attention_mask"].sum(1), rows["rejected_attention_mask"].sum(1))
    stream = BatchStream(rows, cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, lengths=used)

    scorer = RewardScorer(model, tokenizer, max_length=cfg.data.max_length, batch_size=cfg.rm.eval_batch_size,
                          mesh=mesh, keep_params=False)  # scores with the train state's params
    trainer = Trainer(graphdef=nnx.split(model)[0], optimizer=make_optimizer(cfg.optim, cfg.train.steps), mesh=mesh)
    state = trainer.init_state(model, cfg.seed)
    abstract_state = abstract_like(state)
    del model
    loss_fn = pairwise_rm_loss(margin=cfg.rm.margin, center_coef=cfg.rm.center_coef)
    step_fn = build_train_step(trainer, loss_fn, micro_batches=cfg.train.micro_batches)

    def run_step(state, step):
        host = stream.batch(step)
        state, metrics = step_fn(state, shard_batch(host, mesh))
        tokens = int(host["chosen_attention_mask"].sum() + host["rejected_attention_mask"].sum())
        return state, metrics, tokens

    evaluate = None
    if eval_records:
        e_chosen, e_rejected = pair_sequences(eval_records, builder)
        subsets = [getattr(r, "subset", None) for r in eval_records]
        subsets = subsets if any(subsets) else None

        def evaluate(state):
            rc = scorer.score_sequences(e_chosen, params=state["params"])
            rr = scorer.score_sequences(e_rejected, params=state["params"])
            return pairwise_accuracy(rc, rr, subsets=subsets, prefix=stage.metric_prefix)

    result = train_loop(cfg=cfg, state=state, abstract_state=abstract_state, run_step=run_step,
                        evaluate=evaluate, desc=cfg.task)
    extra = {}
    if cfg.rm.export_hf and not result.preempted:
        extra["hf_dir"] = str(export_hf(trainer.model(result.state), tokenizer, run_dir / "hf"))
    summary = summarize(result.eval_before, result.eval_after, task=cfg.task, steps=result.step,
                        preempted=result.preempted, train_pairs=len(train_records), eval_pairs=len(eval_records),
                        **extra, **{k if k.startswith("data/") else f"data/{k}": v for k, v in stats.items()})
    write_summary(cfg, summary)
    return summary
