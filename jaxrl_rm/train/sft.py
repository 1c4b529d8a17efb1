"""Supervised fine-tuning: next-token loss on response tokens only.

Used to make tiny policies and judges. Records: `SFTRecord(prompt, response)` from JSONL (fields
named by `data.prompt_field` / `data.response_field`) or a synthetic task. Prompts go through the
tokenizer's chat template when it has one; rows are padded, or packed with segment masks.
"""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

from jaxrl_rm.data import synthetic
from jaxrl_rm.data.pipeline import BatchStream, pack_examples, pad_examples, tokenize_sft
from jaxrl_rm.data.records import SFTRecord
from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
from jaxrl_rm.kernels import token_logprobs
from jaxrl_rm.eval.policy import verifiable_accuracy
from jaxrl_rm.models.factory import build_model
from jaxrl_rm.rewards.verifiers import make_verifier
from jaxrl_rm.parallel.mesh import mesh_from_config, process_sum
from jaxrl_rm.parallel.rules import shard_batch
from jaxrl_rm.train.loop import prepare_run_dir, summarize, train_loop, write_summary
from jaxrl_rm.train.state import (Trainer, abstract_like, build_eval_step, build_train_step, export_hf,
                                  inject_faults, make_optimizer)


def next_token_loss(model, batch, *, mesh=None):
    """Summed response-token NLL and its token count.

    batch: input_ids `[B, T]` int32, loss_mask `[B, T]` bool (True on tokens to predict),
    attention_mask `[B, T]`, optional segment_ids / positions `[B, T]` (packing).
    mesh: the trainer's mesh; each chip then computes its own rows' log-probs (`token_logprobs`
    under shard_map) instead of XLA gathering every token's hidden onto every chip.
    Returns (nll_sum, n_tokens, {}) — sums, so micro-batching is exact.
    """
    ids = batch["input_ids"]
    hidden = model.hidden_states(ids, attention_mask=batch["attention_mask"],
                                 segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
    b, t, d = hidden.shape
    logp = token_logprobs(hidden[:, :-1].reshape(b * (t - 1), d), model.lm_head_weight(),
                          ids[:, 1:].reshape(-1), mesh=mesh).reshape(b, t - 1)
    mask = batch["loss_mask"][:, 1:].astype(logp.dtype)
    return -(logp * mask).sum(), mask.sum(), {}


def load_sft_records(source: str, cfg, *, seed: int, split: str):
    """Records from a JSONL path, `synthetic:<task>`, or `gsm8k:<path>` / `math:<path>` (prompt ->
    gold final answer, as a verifiable task's data in the RL warm-up); returns (records, bad-row counts)."""
    task = synthetic.parse_source(source)
    if task is not None:
        n = cfg.data.synthetic_size if split == "train" else max(cfg.data.synthetic_size // 8, 64)
        return synthetic.sft_records(task, n, seed=seed, split=split), {}
    from jaxrl_rm.data.loaders import load_records, load_verifiable, problem_format

    if problem_format(source) is not None:
        problems, stats = load_verifiable(source, on_bad_row=cfg.data.on_bad_row)
        records = [SFTRecord(prompt=p.prompt, response=p.answer, id=p.id) for p in problems]
        return records, {"rows_skipped": stats.rows_skipped, "rows_read": stats.rows_read}

    fmap = {cfg.data.prompt_field: "prompt", cfg.data.response_field: "response"}
    records, stats = load_records(source, SFTRecord, on_bad_row=cfg.data.on_bad_row,
                                  field_map={k: v for k, v in fmap.items() if k != v})
    return records, {"rows_skipped": stats.rows_skipped, "rows_read": stats.rows_read}


def tokenized_rows(records, tokenizer, cfg) -> dict:
    examples = [tokenize_sft(r, tokenizer, cfg.data.max_length, chat_template=cfg.data.chat_template)
                for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.data.packing:
        return pack_examples(examples, cfg.data.max_length, pad)
    return pad_examples(examples, cfg.data.max_length, pad)


def run_sft(cfg) -> dict:
    """Train per `cfg` (task=sft); returns the summary written to summary.json."""
    run_dir = prepare_run_dir(cfg)
    tokenizer = load_or_build_tokenizer(cfg.model.tokenizer or cfg.model.path)
    model = build_model(cfg.model, tokenizer, seed=cfg.seed)
    mesh = mesh_from_config(cfg.mesh)

    train_records, train_stats = load_sft_records(cfg.data.train, cfg, seed=cfg.seed, split="train")
    eval_source = cfg.data.eval or (cfg.data.train if cfg.data.train.startswith("synthetic:") else "")
    eval_records = load_sft_records(eval_source, cfg, seed=cfg.seed, split="eval")[0] if eval_source else []
    train_rows = tokenized_rows(train_records, tokenizer, cfg)
    stream = BatchStream(train_rows, cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                         lengths=train_rows["attention_mask"].sum(1))

    trainer = Trainer(graphdef=nnx.split(model)[0], optimizer=make_optimizer(cfg.optim, cfg.train.steps),
                      mesh=mesh)
    state = trainer.init_state(model, cfg.seed)
    abstract_state = abstract_like(state)
    del model
    loss_fn = functools.partial(next_token_loss, mesh=mesh)
    step_fn = build_train_step(trainer, loss_fn, micro_batches=cfg.train.micro_batches)
    eval_fn = build_eval_step(trainer, loss_fn)

    def run_step(state, step):
        host = inject_faults(stream.batch(step), step, cfg.debug.nan_steps)
        state, metrics = step_fn(state, shard_batch(host, mesh))
        metrics = {**metrics, "batch_ids": stream.indices(step).tolist()}
        return state, metrics, process_sum(int(host["attention_mask"].sum()))  # global tokens

    evaluate = None
    if eval_records:
        eval_rows = tokenized_rows(eval_records, tokenizer, cfg)
        eval_stream = BatchStream(eval_rows, cfg.train.batch_size, shuffle=False)
        n_batches = min(cfg.train.eval_batches, max(1, int(np.ceil(eval_stream.steps_per_epoch))))

        accuracy_items = synthetic_eval_problems(cfg)
        accuracy_verifier = make_verifier(synthetic.TASK_VERIFIERS.get(synthetic.parse_source(cfg.data.train), "exact_match"))

        def evaluate(state):
            total, count = 0.0, 0.0
            for i in range(n_batches):
                loss_sum, denom, _ = eval_fn(state["params"], shard_batch(eval_stream.batch(i), mesh))
                total, count = total + float(loss_sum), count + float(denom)
            out = {"eval_loss": total / max(count, 1.0)}
            if accuracy_items:
                out["accuracy"] = verifiable_accuracy(
                    trainer.model(state), tokenizer, accuracy_items, accuracy_verifier,
                    max_prompt_length=cfg.grpo.max_prompt_length, max_new_tokens=cfg.grpo.max_new_tokens,
                    chat_template=cfg.data.chat_template, mesh=mesh)
            return out

    result = train_loop(cfg=cfg, state=state, abstract_state=abstract_state, run_step=run_step,
                        evaluate=evaluate, desc="sft")
    summary = summarize(result.eval_before, result.eval_after, task="sft", steps=result.step,
                        preempted=result.preempted, train_examples=len(train_records),
                        **{f"data/{k}": v for k, v in train_stats.items()})
    write_summary(cfg, summary)
    if not result.preempted:
        export_hf(trainer, result.state["params"], run_dir / "hf", tokenizer)
    return summary


def synthetic_eval_problems(cfg) -> list:
    """Held-out problems of a synthetic verifiable training task (for greedy `accuracy`), else []."""
    task = synthetic.parse_source(cfg.data.train)
    if task is None or task not in synthetic.TASKS:
        return []
    return synthetic.TASKS[task](cfg.grpo.eval_size, seed=cfg.seed, split="eval")
