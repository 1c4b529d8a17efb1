"""GRPO post-training with pluggable reward sources (GRPO / DAPO / Dr.GRPO / GSPO settings).

One RL step (`GRPO.run_step`):
  draw B prompts (task mixture + curriculum) -> sample G completions each (jitted KV-cache
  sampler) -> rewards [B, G] from each task's weighted reward sources (+ DAPO overlong shaping)
  -> group-relative advantages -> (dynamic sampling: drop zero-variance groups, sample more,
  up to a cap) -> old-policy log-probs (the sampler's unfiltered ones when one update per step
  makes them the policy's and no mismatch correction is on; else a trainer forward pass, so that
  TIS / masked IS see exp(old - sampler) != 1) and reference log-probs when kl_coef > 0 ->
  `ppo_epochs` passes of `mini_batches` jitted updates of `objectives.policy_loss_terms`
  (micro-batched exactly).

Sampling seeds are a function of (seed, step, round), prompts of the mixer's counters, so a
resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.data.pipeline import encode, render_prompt
from jaxrl_rm.data.records import PromptItem
from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
from jaxrl_rm.kernels import token_logprobs
from jaxrl_rm.models.factory import build_model
from jaxrl_rm.objectives import group_advantages, policy_loss_terms, zero_variance_groups
from jaxrl_rm.objectives.reduction import LossTerms
from jaxrl_rm.parallel.mesh import mesh_from_config
from jaxrl_rm.parallel.rules import merge_row_blocks, shard_batch, strided_row_blocks, take_rows
from jaxrl_rm.rewards import sources as reward_sources
from jaxrl_rm.rewards.shaping import overlong_penalty
from jaxrl_rm.rewards.sources import EVAL_SCORERS, RULE_REWARDS, Rollouts
from jaxrl_rm.rollout.collect import RolloutCollector, RolloutStats
from jaxrl_rm.train.refresh import attach_refresher
from jaxrl_rm.train.logger import run_means
from jaxrl_rm.train.loop import prepare_run_dir, summarize, train_loop, write_summary
from jaxrl_rm.train.state import (Trainer, abstract_like, build_train_step, export_hf, inject_faults,
                                  make_optimizer)
from jaxrl_rm.rewards.judges import ranking_template, task_template
from jaxrl_rm.train.tasks import TaskMixer, load_task_items, task_demonstrations, warmup_records


def step_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed derived from (seed, step, round, ...): stable across processes and runs."""
    h = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def completion_hidden(model, input_ids, attention_mask, prompt_len: int):
    """Hidden states predicting each completion token: `[N, T, D]` (position P-1+t predicts token P+t)."""
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
    return hidden[:, prompt_len - 1: input_ids.shape[1] - 1]


def completion_logprobs(model, batch, *, prompt_len: int, temperature: float, with_entropy: bool = False,
                        mesh=None):
    """Teacher-forced log-probs of the completion tokens `[N, T]` float32 (and entropy `[N, T]`);
    with the trainer's `mesh`, each chip computes its own rows' (`token_logprobs` under shard_map)."""
    h = completion_hidden(model, batch["input_ids"], batch["attention_mask"], prompt_len)
    n, t, d = h.shape
    out = token_logprobs(h.reshape(n * t, d), model.lm_head_weight(), batch["completion"].reshape(-1),
                         temperature=temperature, with_entropy=with_entropy, mesh=mesh)
    if with_entropy:
        return out[0].reshape(n, t), out[1].reshape(n, t)
    return out.reshape(n, t)


def completion_logprobs_in_chunks(model, batch, *, chunks: int, prompt_len: int, temperature: float,
                                  mesh=None):
    """`completion_logprobs` (no entropy) of `[N, ...]` rows computed `chunks` blocks at a time
    (`lax.map`): the old / reference pass then holds one block's activations, as a micro-batched
    update does, instead of the whole rollout's. Block j takes rows j, j + chunks, ... so each
    chip keeps its own rows. Same values as one pass; N must divide by `chunks`."""
    if chunks == 1:
        return completion_logprobs(model, batch, prompt_len=prompt_len, temperature=temperature, mesh=mesh)
    blocks = strided_row_blocks({k: batch[k] for k in ("input_ids", "attention_mask", "completion")}, chunks)
    out = jax.lax.map(lambda b: completion_logprobs(model, b, prompt_len=prompt_len, temperature=temperature,
                                                    mesh=mesh), blocks)  # [chunks, N / chunks, T]
    return merge_row_blocks(out)


def mismatch_correction(g) -> bool:
    """True when a GRPOConfig `g` corrects the train/infer mismatch (TIS or masked IS): old
    log-probs must then come from the trainer, never be the sampler's."""
    return g.tis_cap > 0 or g.is_mask != "none"


def make_grpo_loss(g, *, prompt_len: int, mesh=None):
    """loss_fn(model, batch) for `build_train_step`, from a GRPOConfig `g`.

    batch: input_ids / attention_mask `[N, P+T]`, completion / loss_mask `[N, T]`,
    old_logp `[N, T]`, advantages `[N]`, sampler_logp `[N, T]` (the sampler's unfiltered log-probs
    at `temperature`: the TIS / masked-IS denominator and the `sampler_logp_gap` monitor),
    optional ref_logp `[N, T]`.
    """
    with_entropy = g.entropy_coef > 0

    def loss_fn(model, batch):
        out = completion_logprobs(model, batch, prompt_len=prompt_len, temperature=g.temperature,
                                  with_entropy=with_entropy, mesh=mesh)
        logp, entropy = out if with_entropy else (out, None)
        mask = batch["loss_mask"]
        terms = policy_loss_terms(
            logp, batch["old_logp"], batch["advantages"], mask,
            clip_low=g.clip_low, clip_high=g.clip_high, clip_ratio_c=g.clip_ratio_c or None,
            ratio_level=g.ratio_level, loss_agg_mode=g.loss_agg_mode,
            loss_norm_length=g.loss_norm_length or g.max_new_tokens,
            ref_logp=batch.get("ref_logp"), kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
            kl_clamp=g.kl_clamp, entropy=entropy, entropy_coef=g.entropy_coef,
            sampler_logp=batch["sampler_logp"] if mismatch_correction(g) else None,
            tis_cap=g.tis_cap or None, tis_level=g.tis_level, is_mask=g.is_mask,
            is_mask_threshold=g.is_mask_threshold)
        # train/infer mismatch monitor: |logp - sampler logp| on the sampled tokens
        gap = jnp.where(mask, jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_logp"]), 0.0)
        means = dict(terms.means, sampler_logp_gap=(gap.sum(), mask.sum().astype(jnp.float32)))
        terms = LossTerms(terms.loss_sum, terms.denominator, means, terms.mins, terms.maxs)
        return terms.loss_sum, terms.denominator, terms

    return loss_fn


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


class GRPO:
    """Holds a GRPO run's static pieces; `run_step` / `evaluate` plug into `train_loop`."""

    def __init__(self, cfg):
        self.cfg, g = cfg, cfg.grpo
        self.g = g
        self.tokenizer = load_or_build_tokenizer(cfg.model.tokenizer or cfg.model.path)
        model = build_model(cfg.model, self.tokenizer, seed=cfg.seed)
        self.mesh = mesh_from_config(cfg.mesh)
        updates = cfg.train.steps * g.ppo_epochs * g.mini_batches
        self.trainer = Trainer(nnx.split(model)[0], make_optimizer(cfg.optim, max(updates, 1)), self.mesh)
        self.state = self.trainer.init_state(model, cfg.seed)
        self.current_params = self.state["params"]
        self.abstract_state = abstract_like(self.state)
        self.ref_params = jax.tree.map(jnp.copy, self.state["params"]) if g.kl_coef > 0 else None
        self.eos = [t for t in {self.tokenizer.eos_token_id} if t is not None]
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.P, self.T = g.max_prompt_length, g.max_new_tokens
        self.tasks = {t.name: t for t in g.tasks}
        train_items = {t.name: load_task_items(t, split="train", seed=cfg.seed, size=cfg.data.synthetic_size)
                       for t in g.tasks}
        self.eval_items = {t.name: load_task_items(t, split="eval", seed=cfg.seed, size=g.eval_size)[: g.eval_size]
                           for t in g.tasks}
        self.mixer = TaskMixer(g.tasks, train_items, seed=cfg.seed)
        # built on first use, per task: `options.win_rate_judge` sources and gold verifiers
        self._win_judges: dict = {}
        self._verifiers: dict = {}
        self._source_ctx = {"tokenizer": self.tokenizer, "mesh": self.mesh, "grpo": self, "seed": cfg.seed}
        self.sources = {t.name: [(reward_sources.build_source(r, self._source_ctx), r.weight) for r in t.rewards]
                        for t in g.tasks}
        # judges and scalar RMs refreshed online (`options.refresh`, train.refresh): their weights
        # and optimizer state ride in the GRPO state (checkpointed with it), their buffers in the
        # host state
        self.refreshers = []
        for i, task in enumerate(g.tasks):
            for j, (src, _) in enumerate(self.sources[task.name]):
                if getattr(src, "refresh_options", None) is not None:
                    attach_refresher(src, key=f"grpo.tasks[{i}].rewards[{j}].options.refresh", mesh=self.mesh,
                                     seed=cfg.seed)
                    self.refreshers.append((task.name, src))
        if self.refreshers:
            self.state = {**self.state, "refresh": [src.refresher.state for _, src in self.refreshers]}
            self.abstract_state = abstract_like(self.state)
        # `options.eval_scorer` (e.g. the hidden quality of open-ended tasks): built, and checked, up front
        self.scorers = {t.name: self.scorer_for(t) for t in g.tasks if t.options.get("eval_scorer")}
        self.rollout = RolloutCollector(
            engine=g.rollout_engine, max_prompt_len=self.P, max_new_tokens=self.T, temperature=g.temperature,
            top_p=g.top_p, top_k=g.top_k, stop_token_ids=self.eos, pad_id=self.pad, mesh=self.mesh,
            num_slots=g.rollout_slots, steps_per_sync=g.rollout_steps_per_sync, kv_cache_dtype=g.kv_cache_dtype)
        self.update = build_train_step(self.trainer, make_grpo_loss(g, prompt_len=self.P, mesh=self.mesh),
                                       micro_batches=cfg.train.micro_batches)
        # the old / reference pass in blocks the size of one update micro-batch
        self._logp = jax.jit(lambda params, batch: completion_logprobs_in_chunks(
            nnx.merge(self.trainer.graphdef, params), batch, chunks=g.mini_batches * cfg.train.micro_batches,
            prompt_len=self.P, temperature=g.temperature, mesh=self.mesh))
        # one update per step: pi_old is the sampling policy, and the sampler's unfiltered log-probs
        # are its log-probs up to the train/infer mismatch - which a correction must measure
        self.reuse_sampler_logp = g.ppo_epochs * g.mini_batches == 1 and not mismatch_correction(g)
        rows = g.prompts_per_step * g.num_samples // g.mini_batches
        if rows % cfg.train.micro_batches:
            raise ValueError(f"train.micro_batches={cfg.train.micro_batches} must divide the mini-batch of "
                             f"{rows} rows (grpo.prompts_per_step * grpo.num_samples / grpo.mini_batches)")

    # --- prompts ---------------------------------------------------------------------------
    def prompt_text(self, item: PromptItem) -> str:
        """What the policy sees for an item: the task's prompt format through the chat template
        (a ranking / judgment task's template shows a chat-message prompt as `role: content` lines)."""
        from jaxrl_rm.rewards.judge_source import prompt_as_text

        task = self.tasks[item.task]
        if task.kind == "ranking":
            return ranking_template(task).render(self.tokenizer if self.cfg.data.chat_template else None,
                                                 prompt=prompt_as_text(item.prompt), responses=list(item.responses))
        if task.kind == "judgment":
            template = task_template(task, "pointwise_correctness")
            fields = {"reference": item.reference} if template.uses_reference else {}
            return template.render(self.tokenizer if self.cfg.data.chat_template else None,
                                   prompt=prompt_as_text(item.prompt), response=item.responses[0], **fields)
        return render_prompt(item.prompt, self.tokenizer, chat_template=self.cfg.data.chat_template)

    def sample(self, params, items: list[PromptItem], *, seed: int, num_samples: int, greedy: bool = False):
        """Generate for `items` -> (Rollouts, GenerationResult)."""
        texts = [self.prompt_text(it) for it in items]
        prompts = [encode(self.tokenizer, t)[-self.P:] for t in texts]
        model = nnx.merge(self.trainer.graphdef, params)
        res = self.rollout.generate(model, prompts, num_samples=num_samples, seed=seed, greedy=greedy)
        tokens, mask = np.asarray(res.tokens), np.asarray(res.mask)
        b, gsz = len(items), num_samples
        decoded = self.tokenizer.batch_decode([row[m] for row, m in zip(tokens, mask)], skip_special_tokens=True)
        rollouts = Rollouts(
            items=list(items), prompt_texts=texts,
            completions=[decoded[i * gsz:(i + 1) * gsz] for i in range(b)],
            completion_ids=tokens.reshape(b, gsz, -1), completion_mask=mask.reshape(b, gsz, -1),
            lengths=np.asarray(res.lengths).reshape(b, gsz),
            truncated=(np.asarray(res.finish_reason) == "length").reshape(b, gsz))
        return rollouts, res, prompts

    def rewards(self, rollouts: Rollouts, *, step: int | None = None) -> tuple[np.ndarray, dict, np.ndarray]:
        """Score a step's rollouts -> (rewards `[B, G]`, metrics, filter values `[B, G]`).

        step: the training step that sampled them (None outside training): refreshed judges then
        keep them, teacher-labelled, for their next refresh.

        rewards: per task, Σ weight · source (the *score*), plus DAPO overlong shaping — what the
        update trains on. filter values: what DAPO dynamic sampling tests for zero variance, per
        `grpo.dynamic_sampling_metric` (as verl's `filter_groups.metric`): `acc` the correctness
        of the task's weighted rule verifier (`verifier` / `exact_match`; reward > 0), or its score
        when it has none (judges, RMs, rankings); `score` the task reward before shaping;
        `seq_final_reward` the shaped reward. Shaping is left out of the first two so that a group
        of all-right (or all-wrong) answers of different lengths is not kept to train on length.
        """
        b, gsz = rollouts.shape
        scores = np.zeros((b, gsz), np.float32)
        acc = np.zeros((b, gsz), np.float32)
        metrics: dict[str, float] = {}
        by_task: dict[str, list[int]] = {}
        for i, item in enumerate(rollouts.items):
            by_task.setdefault(item.task, []).append(i)
        for task, rows in by_task.items():
            sub, parts = rollouts.subset(rows), {}
            r, m = reward_sources.combine(self.sources[task], sub, parts)
            scores[rows] = r
            verifiers = [src.name for (src, weight), spec in zip(self.sources[task], self.tasks[task].rewards)
                         if spec.type in reward_sources.VERIFIER_REWARDS and weight != 0]
            acc[rows] = (parts[verifiers[0]] > 0).astype(np.float32) if verifiers else r
            metrics.update({f"reward/{task}/{k}": v for k, v in m.items()})
            metrics[f"reward/{task}/mean"] = float(r.mean())
            gold = self.gold_labels(self.tasks[task], sub)
            metrics.update(self.gold_monitor(self.tasks[task], sub, parts, gold))
            if step is not None:
                for t, src in self.refreshers:
                    if t == task and gold is not None:
                        src.refresher.observe(step, sub, gold, parts[src.name])
        rewards = scores
        if self.g.overlong_buffer > 0:
            shaping = overlong_penalty(rollouts.lengths, rollouts.truncated, max_new_tokens=self.T,
                                       buffer=self.g.overlong_buffer, penalty=self.g.overlong_penalty)
            rewards = scores + shaping
            metrics["reward/overlong_shaping"] = float(shaping.mean())
        signal = {"acc": acc, "score": scores, "seq_final_reward": rewards}[self.g.dynamic_sampling_metric]
        return rewards, metrics, signal

    def gold_labels(self, task, rollouts: Rollouts) -> np.ndarray | None:
        """Gold correctness `[B, G]` bool of a model-scored verifiable task's rollouts (its
        `verifier_for`), or None where there is nothing to check (a rule-rewarded task, a task
        that is not verifiable, items without answers)."""
        model_based = [spec for spec in task.rewards if spec.type not in RULE_REWARDS]
        if task.kind != "verifiable" or not model_based or any(it.answer is None for it in rollouts.items):
            return None
        b, gsz = rollouts.shape
        out = reward_sources.verify_rollouts(self.verifier_for(task), rollouts)  # as a verifier reward sees them
        return (np.asarray(out.rewards, np.float32) > 0).reshape(b, gsz)

    def gold_monitor(self, task, rollouts: Rollouts, parts: dict[str, np.ndarray], gold: np.ndarray | None) -> dict:
        """Reward-hacking monitor for model-scored verifiable tasks: the same rollouts checked
        against the gold answers (`verifier_for(task)`). Logs `reward/<task>/gold_accuracy` and,
        per model-based source, `<source>/gold_gap` (mean reward - gold accuracy: > 0 means the
        model rewards wrong answers), `<source>/gold_agreement` (reward > 0.5 iff correct) and
        `<source>/gold_auc` (within groups holding both: how often a correct rollout out-scores a
        wrong one, ties 1/2 — the ordering GRPO's advantages act on; logged when such groups exist),
        and what reaches the update (`gold_diagnostics`): `<source>/gold_fpr` / `gold_fnr` (the
        source's false-positive / false-negative rate on the *current* policy's answers, reward >
        0.5 read as "correct"), `<source>/gold_corr` (mean within-group correlation of reward and
        correctness) and `<source>/gold_order_agreement` (share of groups holding both kinds whose
        correct answers get the higher mean reward, i.e. a positive net advantage), next to
        `reward/<task>/gold_mixed_groups` (share of groups holding both kinds: where a gold reward
        would give a signal), and what the policy writes (`answer_kinds`:
        `reward/<task>/answers/{right,edit1,edit2_3,edit4plus,long}`, whose drift from the first
        steps' shares shows the policy leaving the answers a reward model was trained on). For
        `self_judge` the gap is URPO's self-preference: `reward/<task>/self_preference`."""
        if gold is None:
            return {}
        model_based = [src.name for (src, _), spec in zip(self.sources[task.name], task.rewards)
                       if spec.type not in RULE_REWARDS]
        prefix = f"reward/{task.name}"
        metrics = {f"{prefix}/gold_accuracy": float(gold.mean()),
                   f"{prefix}/gold_mixed_groups": float((gold.any(axis=1) & ~gold.all(axis=1)).mean())}
        gsz = rollouts.shape[1]
        kinds = answer_kinds([c for cs in rollouts.completions for c in cs],
                             [it.answer for it in rollouts.items for _ in range(gsz)], gold.ravel())
        metrics.update({f"{prefix}/answers/{k}": v for k, v in kinds.items()})
        for name in model_based:
            gap = float(parts[name].mean() - gold.mean())
            metrics[f"{prefix}/{name}/gold_gap"] = gap
            metrics[f"{prefix}/{name}/gold_agreement"] = float(((parts[name] > 0.5) == gold).mean())
            auc = gold_auc(parts[name], gold)
            if auc is not None:
                metrics[f"{prefix}/{name}/gold_auc"] = auc
            metrics.update({f"{prefix}/{name}/gold_{k}": v for k, v in gold_diagnostics(parts[name], gold).items()})
            if name == "self_judge":
                metrics[f"{prefix}/self_preference"] = gap
        return metrics

    # --- one RL step -------------------------------------------------------------------------
    def collect(self, params, step: int):
        """Sample and score B groups, with DAPO dynamic sampling when enabled.

        Returns (kept parts, metrics); a part is (Rollouts, GenerationResult, prompts, rewards, live)
        where `live` [b] marks groups that train (False: zero-variance filler when the cap hit).
        """
        g, B = self.g, self.g.prompts_per_step
        self.current_params = params  # self-judging reward sources (URPO) score with the live policy
        parts, kept, generated, dropped, flat, metrics, rollout_stats = [], 0, 0, 0, 0, {}, []
        for rnd in range(1 + (g.max_sampling_rounds if g.dynamic_sampling else 0)):
            items = self.mixer.draw(step, B)
            rollouts, res, prompts = self.sample(params, items, seed=step_seed(self.cfg.seed, step, rnd),
                                                 num_samples=g.num_samples)
            rollout_stats.append(self.rollout.stats)
            rewards, m, signal = self.rewards(rollouts, step=step)
            if rnd == 0:
                metrics.update(m)
            generated += B
            flat += int(np.asarray(zero_variance_groups(jnp.asarray(rewards))).sum())
            if g.dynamic_sampling:
                zero = np.asarray(zero_variance_groups(jnp.asarray(signal)))
                dropped += int(zero.sum())
                take = np.flatnonzero(~zero)[: B - kept]
                parts.append((rollouts, res, prompts, rewards, take))
                kept += len(take)
                if kept == B:
                    break
            else:
                parts.append((rollouts, res, prompts, rewards, np.arange(B)))
                kept = B
        metrics["zero_variance_fraction"] = flat / generated  # groups whose rewards give no advantage
        metrics.update(RolloutStats.step_metrics(rollout_stats))
        metrics["sampling_rounds"] = len(parts)
        if g.dynamic_sampling:
            metrics["dynamic_sampling/dropped_fraction"] = dropped / generated
            metrics["dynamic_sampling/filled_fraction"] = kept / B
        return parts, kept, metrics

    def build_batch(self, parts, kept: int) -> tuple[dict, dict]:
        """Training rows (B*G) from the kept groups; filler rows (cap reached) have loss_mask 0."""
        g, B, G, P, T = self.g, self.g.prompts_per_step, self.g.num_samples, self.P, self.T
        ids, attn, comp, cmask, slogp, rew, live = [], [], [], [], [], [], []
        for rollouts, res, prompts, rewards, take in parts:
            tokens, mask = np.asarray(res.tokens), np.asarray(res.mask)
            logp = np.asarray(res.unfiltered_logprobs)  # what the trainer recomputes (no top-p/k)
            for i in take:
                for j in range(G):
                    r = i * G + j
                    p = prompts[i]
                    row = np.full(P + T, self.pad, np.int32)
                    row[P - len(p):P] = p
                    row[P:] = tokens[r]
                    am = np.zeros(P + T, bool)
                    am[P - len(p):P] = True
                    am[P:] = mask[r]
                    ids.append(row), attn.append(am), comp.append(tokens[r]), cmask.append(mask[r])
                    slogp.append(logp[r])
                rew.append(rewards[i]), live.append(True)
        # cap reached: fill with the last round's groups, masked out of the loss
        filler = parts[-1]
        f = 0
        while len(rew) < B:
            rollouts, res, prompts, rewards, _ = filler
            i = f % len(prompts)
            f += 1
            for j in range(G):
                r = i * G + j
                ids.append(np.full(P + T, self.pad, np.int32)), attn.append(np.zeros(P + T, bool))
                comp.append(np.asarray(res.tokens)[r]), cmask.append(np.zeros(T, bool))
                slogp.append(np.zeros(T, np.float32))
            rew.append(np.zeros(G, np.float32)), live.append(False)
        rewards = np.stack(rew)
        adv = np.asarray(group_advantages(jnp.asarray(rewards), mode=g.advantage))
        adv = adv * np.asarray(live)[:, None]
        loss_mask = np.stack(cmask)
        truncated = ~np.any(np.stack(cmask) & np.isin(np.stack(comp), self.eos), axis=1)
        if g.mask_truncated:
            loss_mask = loss_mask & ~truncated[:, None]
        batch = {"input_ids": np.stack(ids), "attention_mask": np.stack(attn), "completion": np.stack(comp),
                 "loss_mask": loss_mask, "advantages": adv.reshape(-1).astype(np.float32),
                 "sampler_logp": np.stack(slogp).astype(np.float32)}
        # statistics of everything sampled this step (kept or dropped): what the policy does
        flat_r = np.concatenate([p[3].ravel() for p in parts])
        flat_len = np.concatenate([p[0].lengths.ravel() for p in parts])
        metrics = {"reward_mean": float(flat_r.mean()), "reward_std": float(flat_r.std()),
                   "reward_min": float(flat_r.min()), "reward_max": float(flat_r.max()),
                   "response_length": float(flat_len.mean()),
                   "truncated_fraction": float(np.concatenate([p[0].truncated.ravel() for p in parts]).mean()),
                   "reward_length_correlation": pearson(flat_r, flat_len)}
        return batch, metrics

    def run_step(self, state, step: int):
        """One RL step -> (state, metrics, tokens processed)."""
        if self.refreshers:  # the refreshed models' state (restored from a checkpoint or not)
            for (_, src), refreshed in zip(self.refreshers, state["refresh"]):
                src.refresher.state = refreshed
            state = {k: v for k, v in state.items() if k != "refresh"}
        t0 = time.perf_counter()
        parts, kept, metrics = self.collect(state["params"], step)
        t_sample = time.perf_counter() - t0
        batch, m = self.build_batch(parts, kept)
        metrics.update(m)
        batch = inject_faults(batch, step, self.cfg.debug.nan_steps)
        device_batch = shard_batch(batch, self.mesh)
        if self.reuse_sampler_logp:
            device_batch["old_logp"] = device_batch["sampler_logp"]
        else:
            device_batch["old_logp"] = self._logp(state["params"], device_batch)
        if self.ref_params is not None:
            device_batch["ref_logp"] = self._logp(self.ref_params, device_batch)
        n = batch["input_ids"].shape[0]
        rows = n // self.g.mini_batches
        update_metrics = []
        for epoch in range(self.g.ppo_epochs):
            order = np.random.default_rng([self.cfg.seed, step, epoch]).permutation(n) \
                if self.g.mini_batches > 1 else np.arange(n)
            for k in range(self.g.mini_batches):
                idx = order[k * rows:(k + 1) * rows]
                mb = device_batch if self.g.mini_batches == 1 else take_rows(device_batch, idx, self.mesh)
                state, um = self.update(state, mb)
                update_metrics.append(um)
        um = jax.device_get(update_metrics[-1])
        metrics.update({k: float(v) for k, v in um.items()})
        metrics["skipped_updates"] = float(sum(int(u["skipped"]) for u in jax.device_get(update_metrics)))
        metrics["skipped"] = int(metrics["skipped_updates"] > 0)
        # fingerprint of what was sampled: resumed runs must reproduce it step for step
        metrics["sample_hash"] = hashlib.blake2b(batch["completion"].tobytes(), digest_size=8).hexdigest()
        metrics["time/sample_s"] = t_sample
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics["batch_ids"] = [str(it.id) for part in parts for it in part[0].items]
        tokens = int(batch["attention_mask"].sum())
        if self.refreshers:
            for task, src in self.refreshers:
                if src.refresher.due(step):
                    metrics.update({f"reward/{task}/{src.name}/{k}": v for k, v in src.refresher.refresh(step).items()})
            state = {**state, "refresh": [src.refresher.state for _, src in self.refreshers]}
        return state, metrics, tokens

    # --- evaluation ---------------------------------------------------------------------------
    def verifier_for(self, task):
        """The verifier that measures a verifiable task's held-out accuracy: `options.eval_verifier`
        (verifier | exact_match | path_check) when set, else the task's first rule-verifier reward
        (its options included), else math-verify. Judge-rewarded tasks are still evaluated against gold.
        Built once per task: the gold monitor calls it every step, and a math verifier keeps its
        worker processes between calls."""
        if task.name in self._verifiers:
            return self._verifiers[task.name]
        from jaxrl_rm.rewards.verifiers import make_verifier

        kind = task.options.get("eval_verifier")
        specs = [s for s in task.rewards if s.type in reward_sources.VERIFIER_REWARDS]
        if kind:
            try:
                verifier = make_verifier(kind)
            except ValueError as e:
                raise ValueError(f"grpo.tasks[{task.name}].options.eval_verifier: {e}") from e
        elif specs:
            verifier = make_verifier(specs[0].type, **{k: v for k, v in specs[0].options.items() if k != "name"})
        else:
            verifier = make_verifier("verifier")
        self._verifiers[task.name] = verifier
        return verifier

    def scorer_for(self, task):
        """The rule reward named by a non-verifiable task's `options.eval_scorer` (one of
        `EVAL_SCORERS`, e.g. the miniature world's hidden scoring function `hidden_quality`)."""
        from jaxrl_rm.config import RewardSpec

        kind, key = task.options["eval_scorer"], f"grpo.tasks[{task.name}].options.eval_scorer"
        if task.kind == "verifiable":
            raise ValueError(f"{key}: only for non-verifiable tasks (verifiable ones report accuracy/{task.name})")
        if not isinstance(kind, str) or kind not in EVAL_SCORERS:
            raise ValueError(f"{key}: unknown scorer {kind!r}; available: {list(EVAL_SCORERS)}")
        return reward_sources.build_source(RewardSpec(type=kind), self._source_ctx)

    def evaluate(self, state) -> dict:
        """Greedy held-out accuracy per verifiable task (`accuracy/<task>`, overall `accuracy`),
        and mean reward of the task's sources for the other tasks (`eval_reward/<task>`; for a
        ranking task also its sources' metrics, `eval_reward/<task>/ranking/top1` ...) plus, with
        `options.eval_scorer`, the mean score of that scorer (`quality/<task>`) on the same answers.
        Judges give evaluation verdicts greedily (or as the mean of their `eval_num_judgments`
        samples: `reward_sources.for_eval`), so the same policy always gets the same numbers."""
        from jaxrl_rm.eval.policy import verifiable_accuracy

        out, correct, total = {}, 0.0, 0
        self.current_params = state["params"]  # self-judging sources must not see donated buffers
        model = nnx.merge(self.trainer.graphdef, state["params"])
        for name, items in self.eval_items.items():
            if not items:
                continue
            task = self.tasks[name]
            if task.kind == "verifiable":
                acc = verifiable_accuracy(model, self.tokenizer, items, self.verifier_for(task),
                                          max_prompt_length=self.P, max_new_tokens=self.T,
                                          chat_template=self.cfg.data.chat_template, mesh=self.mesh)
                out[f"accuracy/{name}"] = acc
                correct, total = correct + acc * len(items), total + len(items)
            else:
                rollouts, _, _ = self.sample(state["params"], items, seed=0, num_samples=1, greedy=True)
                judged = [(reward_sources.for_eval(src), w) for src, w in self.sources[name]]
                r, metrics = reward_sources.combine(judged, rollouts)
                out[f"eval_reward/{name}"] = float(r.mean())
                if task.kind == "ranking":  # what a Kendall-tau mean hides: top-1 hits, all-tied rankings
                    out.update({f"eval_reward/{name}/{k}": v for k, v in metrics.items() if not k.endswith("/mean")})
                if name in self.scorers:
                    out[f"quality/{name}"] = float(np.mean(self.scorers[name](rollouts)[0]))
            if task.options.get("win_rate_judge"):
                out[f"win_rate/{name}"] = self.win_rate(task, state["params"], items)
        if total:
            out["accuracy"] = correct / total
        return out

    def win_rate(self, task, params, items: list[PromptItem]) -> float:
        """Win rate of the policy's greedy answers against the items' references, judged by
        `task.options.win_rate_judge` (a reward spec, default type judge) in pairwise mode with
        both orders: each item is a group of two rollouts (policy, reference), and the judge's
        pairwise reward of the policy's rollout is its win rate (outcomes, whatever the spec's
        `pairwise_reward`; tie / invalid verdict = 1/2). Verdicts are greedy, or the mean of the
        spec's `options.eval_num_judgments` samples (`JudgeSource.for_eval`)."""
        from jaxrl_rm.config import RewardSpec

        items = [it for it in items if it.reference is not None]
        if not items:
            raise ValueError(f"grpo.tasks[{task.name}].options.win_rate_judge: the task's eval items carry no "
                             "reference answers to compare against")
        if task.name not in self._win_judges:
            spec = dict(task.options["win_rate_judge"])
            opts = {"mode": "pairwise", "name": "win_rate_judge", **spec.pop("options", {}),
                    "pairwise_reward": "outcome"}
            self._win_judges[task.name] = reward_sources.for_eval(reward_sources.build_source(
                RewardSpec(type=spec.pop("type", "judge"), path=spec.pop("path", ""), options=opts),
                self._source_ctx))
        rollouts, _, _ = self.sample(params, items, seed=0, num_samples=1, greedy=True)
        zeros = np.zeros((len(items), 2, 1), np.int32)
        pairs = Rollouts(items=items, prompt_texts=rollouts.prompt_texts,
                         completions=[[c[0], it.reference] for c, it in zip(rollouts.completions, items)],
                         completion_ids=zeros, completion_mask=zeros.astype(bool),
                         lengths=np.zeros((len(items), 2), np.int32), truncated=np.zeros((len(items), 2), bool))
        r, _ = self._win_judges[task.name](pairs)
        return float(np.asarray(r)[:, 0].mean())

    def host_state(self) -> dict:
        return {"mixer": self.mixer.state(),
                "refresh": [src.refresher.host_state() for _, src in self.refreshers]}

    def restore_host_state(self, host: dict) -> None:
        self.mixer.load_state(host.get("mixer", {}))
        for (_, src), saved in zip(self.refreshers, host.get("refresh", [])):
            src.refresher.restore_host_state(saved)

    def guard_report(self) -> dict:
        report: dict[str, int] = {}
        for weighted in self.sources.values():
            for source, _ in weighted:
                if hasattr(source, "guard_report"):
                    for k, v in source.guard_report().items():
                        report[k] = report.get(k, 0) + int(v)
        return report


def gold_auc(rewards: np.ndarray, gold: np.ndarray) -> float | None:
    """Within-group ranking quality of `rewards` `[B, G]` against `gold` `[B, G]` bool: over the
    (correct, wrong) rollout pairs of each group, the share where the correct one scores higher
    (a tie counts 1/2). None when no group holds both kinds."""
    wins, pairs = 0.0, 0
    for r, g in zip(np.asarray(rewards, np.float64), np.asarray(gold, bool)):
        good, bad = r[g], r[~g]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return wins / pairs if pairs else None


def gold_diagnostics(rewards: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """What a learned reward `[B, G]` passes to GRPO, against `gold` `[B, G]` bool (see
    `GRPO.gold_monitor`): `fpr` (share of wrong rollouts rewarded > 0.5), `fnr` (share of correct
    ones rewarded <= 0.5), `corr` (mean over groups where both vary of the within-group Pearson
    correlation of reward and correctness), `order_agreement` (over groups holding both kinds,
    the share whose correct rollouts get the higher mean reward: the net advantage pushes toward
    the correct answers; a tie does not). A key is left out when no rollout / group qualifies."""
    r, g = np.asarray(rewards, np.float64), np.asarray(gold, bool)
    out = {}
    if (~g).any():
        out["fpr"] = float((r[~g] > 0.5).mean())
    if g.any():
        out["fnr"] = float((r[g] <= 0.5).mean())
    corrs, agree = [], []
    for rg, gg in zip(r, g):
        if gg.any() and not gg.all():
            agree.append(rg[gg].mean() > rg[~gg].mean())
            if rg.std() > 0:
                corrs.append(np.corrcoef(rg, gg.astype(np.float64))[0, 1])
    if corrs:
        out["corr"] = float(np.mean(corrs))
    if agree:
        out["order_agreement"] = float(np.mean(agree))
    return out


def answer_kinds(completions: list[str], answers: list[str], gold: np.ndarray, *, max_chars: int = 64) -> dict:
    """Shares of the rollouts by how far each is from its gold answer: `right` (gold label),
    `edit1` / `edit2_3` / `edit4plus` (a wrong answer's Levenshtein distance to the gold answer,
    both stripped), `long` (a wrong answer or gold answer over `max_chars` characters: not
    measured). A reward model learns the kinds of answers it was trained on; these shares, logged
    per step, show how far the policy's answers drift from those (docs/miniature_results.md)."""
    counts = dict.fromkeys(("right", "edit1", "edit2_3", "edit4plus", "long"), 0)
    for completion, answer, right in zip(completions, answers, np.asarray(gold, bool)):
        a, b = completion.strip(), str(answer).strip()
        if right:
            counts["right"] += 1
        elif max(len(a), len(b)) > max_chars:
            counts["long"] += 1
        else:
            d = levenshtein(a, b)
            counts["edit1" if d <= 1 else "edit2_3" if d <= 3 else "edit4plus"] += 1
    n = max(len(completions), 1)
    return {k: v / n for k, v in counts.items()}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) of two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def check_warmup_fits(cfg, demos: dict[str, list]) -> None:
    """Every task's warm-up demonstrations fit `grpo.max_new_tokens` (`check_demonstrations_fit`):
    a format the policy cannot finish within the budget is a config error, found before training."""
    from jaxrl_rm.data.pipeline import check_demonstrations_fit
    from jaxrl_rm.data.tokenizer import load_or_build_tokenizer

    tokenizer = load_or_build_tokenizer(cfg.model.tokenizer or cfg.model.path)
    for name, records in demos.items():
        check_demonstrations_fit(records, tokenizer, max_new_tokens=cfg.grpo.max_new_tokens,
                                 chat_template=cfg.data.chat_template, where=f"grpo.max_new_tokens (task {name!r})")


def warm_start(cfg):
    """Run the SFT warm-up stage when configured; returns cfg with `model.path` at its export
    (None when the stage was preempted: rerun the command to resume it)."""
    w = cfg.warmup
    if w.steps <= 0:
        return cfg
    from jaxrl_rm.train.sft import run_sft

    stage_dir = Path(cfg.run_dir) / "sft_warmup"
    export = stage_dir / "hf"
    if not (export / "config.json").exists():
        data = w.data
        if not data:
            demos = task_demonstrations(cfg.grpo.tasks, seed=cfg.seed, size=cfg.data.synthetic_size)
            check_warmup_fits(cfg, demos)
        if not data and (len(cfg.grpo.tasks) > 1 or cfg.grpo.tasks[0].kind != "verifiable"):
            # demonstrations of every task, mixed (a lone verifiable task's data is SFT data as is)
            from jaxrl_rm.data.loaders import write_jsonl

            stage_dir.mkdir(parents=True, exist_ok=True)
            data = str(stage_dir / "demonstrations.jsonl")
            write_jsonl(data, warmup_records(demos, seed=cfg.seed))
        sft_cfg = dataclasses.replace(
            cfg, task="sft", run_dir=str(stage_dir),
            train=dataclasses.replace(cfg.train, steps=w.steps, batch_size=w.batch_size, micro_batches=1),
            optim=dataclasses.replace(cfg.optim, learning_rate=w.learning_rate, schedule=w.schedule,
                                      warmup_steps=w.warmup_steps),
            data=dataclasses.replace(cfg.data, train=data or cfg.grpo.tasks[0].data, eval=""))
        if run_sft(sft_cfg).get("preempted"):
            return None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(export), tokenizer=str(export)))


def run_grpo(cfg) -> dict:
    """Train per `cfg` (task=grpo); returns the summary written to summary.json."""
    prepare_run_dir(cfg)
    cfg = warm_start(cfg)
    if cfg is None:
        return {"task": "grpo", "preempted": True, "stage": "sft_warmup"}
    rl = GRPO(cfg)
    result = train_loop(cfg=cfg, state=rl.state, abstract_state=rl.abstract_state, run_step=rl.run_step,
                        evaluate=rl.evaluate, host_state=rl.host_state, restore_host_state=rl.restore_host_state,
                        desc="grpo")
    summary = summarize(result.eval_before, result.eval_after, task=cfg.task, steps=result.step,
                        preempted=result.preempted)
    summary["reward_guard"] = rl.guard_report()
    summary.update(run_means(cfg.run_dir, "reward/"))  # the run's average reward monitors
    write_summary(cfg, summary)
    if not result.preempted:
        export_hf(rl.trainer, result.state["params"], Path(cfg.run_dir) / "hf", rl.tokenizer)
        for task, src in rl.refreshers:  # the judges and RMs as the refreshes left them
            r = src.refresher
            export_hf(r.trainer, r.state["params"], Path(cfg.run_dir) / "refreshed" / f"{task}.{src.name}",
                      r.tokenizer)
    rl.final_state = result.state
    return summary
