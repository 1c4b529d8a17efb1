"""Online refresh: a learned reward (a `type: judge` judge, a `bt_rm` / `polar_rm` scalar RM) kept
precise on the policy it rewards.

A reward model trained on the SFT policy's answers meets, after some RL steps, answers it never
saw, and the ones it over-rates are what GRPO learns to write (docs/miniature_results.md,
"Diagnosis"). With ``options.refresh`` on such a reward, the run itself keeps it up to date: every
rollout it scores is labelled by the task's teacher (its gold verifier, `GRPO.verifier_for`: exact
match or math-verify against the gold answer) and kept in a buffer of the last ``buffer_steps``
steps; every ``every`` policy steps the model takes ``steps`` training steps on that buffer, with
its own AdamW state (constant lr, b2 0.99, grad clip 1). Only training prompts' rollouts enter the
buffer, so the reward never trains on the policy's held-out prompts.

- **Judges** (`JudgeRefresher`) take SFT steps on the buffered judgments written as the warm-up
  writes them (`train.judge.warmup_records`: the judge prompt -> ``<think>…</think><score>s</score>``
  with the teacher's verdict and the chosen reasoning).
- **Scalar RMs** (`RMRefresher`) take Bradley–Terry steps on pairs of the same prompt's answers,
  right ≻ wrong (every such pair in the buffer): `bt_rm` on (prompt, answer), `polar_rm` on
  (prompt, gold answer as reference) ⟶ answer, the inputs it scores with.

Options (``grpo.tasks[].rewards[].options.refresh``, all optional):

==================  =======  ==================================================================
key                 default  meaning
==================  =======  ==================================================================
``every``           25       policy steps between refreshes (after the update of step k·every)
``steps``           20       training steps per refresh
``batch_size``      32       judgments (RMs: pairs) per training step
``learning_rate``   1e-4     constant AdamW learning rate (b2 0.99, grad clip 1)
``buffer_steps``    every    how many recent steps' rollouts a refresh trains on
``mistakes``        0        extra copies, per refresh, of each buffered example the reward got
                             wrong when it scored it (a judge: reward > 0.5 for a wrong answer,
                             or <= 0.5 for a right one; an RM: the wrong answer scored at least
                             as high as the right one): the answers the policy is learning to
                             exploit, trained on more than the rest
``think``           compare  judges only: the reasoning written before the verdict:
                             ``aligned`` (the `{aligned}` view's pair-by-pair check), ``path``,
                             ``compare``, ``reference``, ``response``, ``fixed`` (as
                             ``judge.warmup_think``)
``balance``         true     judges only: downsample the buffer to equal right / wrong counts
``corrupt``         0.0      judges only: share of judgments whose answer is replaced by a
                             rule-made one (``judge.warmup_corrupt``); 1.0 trains on off-policy
                             data only (the prompts of the policy's steps, none of its answers)
==================  =======  ==================================================================

The model's weights and optimizer state live in the GRPO state (``state["refresh"]``, so
checkpoints hold them) and the buffer in the host state: a resumed run refreshes exactly as the
uninterrupted one. Metrics, at each refresh: ``reward/<task>/<name>/refresh/{loss_first,
loss_last,examples,mistakes,count}`` (judges also ``positive``); between refreshes the gold
monitor's ``gold_fpr`` / ``gold_fnr`` / ``gold_auc`` show how the reward does on the current
answers. The refreshed models are exported at the end to ``<run_dir>/refreshed/<task>.<name>/``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxrl_rm.config import WarmupThink
from jaxrl_rm.configlib import ConfigError
from jaxrl_rm.data.records import JudgmentExample

THINK = typing.get_args(WarmupThink)


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """`options.refresh` of a scalar RM (and the keys a judge's shares)."""

    every: int = 25
    steps: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-4
    buffer_steps: int = 0  # 0 = `every`
    mistakes: int = 0

    @classmethod
    def parse(cls, value: Any, key: str = "options.refresh"):
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {names}, got {value!r}")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; valid: {names}")
        cfg = cls(**value)
        for name in ("every", "steps", "batch_size"):
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise ConfigError(f"{key}.{name}: must be an integer >= 1, got {getattr(cfg, name)!r}")
        if not isinstance(cfg.mistakes, int) or cfg.mistakes < 0:
            raise ConfigError(f"{key}.mistakes: must be an integer >= 0, got {cfg.mistakes!r}")
        if not isinstance(cfg.buffer_steps, int) or cfg.buffer_steps < 0:
            raise ConfigError(f"{key}.buffer_steps: must be an integer >= 0 (0 = every), got {cfg.buffer_steps!r}")
        if not float(cfg.learning_rate) > 0:
            raise ConfigError(f"{key}.learning_rate: must be > 0, got {cfg.learning_rate!r}")
        return dataclasses.replace(cfg, learning_rate=float(cfg.learning_rate), buffer_steps=cfg.buffer_steps or cfg.every,
                                   **cfg.check(key))

    def check(self, key: str) -> dict:
        """Validate a subclass's own keys -> their normalised values (e.g. ints as floats)."""
        return {}


@dataclasses.dataclass(frozen=True)
class JudgeRefreshConfig(RefreshConfig):
    """`options.refresh` of a `type: judge` reward."""

    think: str = "compare"
    balance: bool = True
    corrupt: float = 0.0

    def check(self, key: str) -> dict:
        if self.think not in THINK:
            raise ConfigError(f"{key}.think: must be one of {list(THINK)}, got {self.think!r}")
        if not isinstance(self.corrupt, (int, float)) or not 0.0 <= float(self.corrupt) <= 1.0:
            raise ConfigError(f"{key}.corrupt: must be in [0, 1], got {self.corrupt!r}")
        return {"corrupt": float(self.corrupt)}


def attach_refresher(source, *, key: str, mesh, seed: int):
    """Make a reward source whose options held `refresh` a refreshed one (`JudgeRefresher` for a
    `type: judge` source, `RMRefresher` for `bt_rm` / `polar_rm`); `key` names the options in
    errors (e.g. `grpo.tasks[0].rewards[1].options.refresh`)."""
    from jaxrl_rm.rewards.judge_source import JudgeSource
    from jaxrl_rm.rewards.scalar_rm import ScalarRMSource

    if isinstance(source, JudgeSource):
        return JudgeRefresher.attach(source, key=key, mesh=mesh, seed=seed)
    if isinstance(source, ScalarRMSource):
        return RMRefresher.attach(source, key=key, mesh=mesh, seed=seed)
    raise ConfigError(f"{key}: online refresh is for `judge`, `bt_rm` and `polar_rm` rewards, not "
                      f"{type(source).__name__}")


class Refresher:
    """What a judge's and an RM's refresher share: the model's own train state (AdamW, constant
    lr, b2 0.99) and step, the schedule of refreshes, and the window of the buffer (a list whose
    entries start with the policy step that made them)."""

    cfg: RefreshConfig
    buffer: list

    def _init_training(self, model, loss_fn, *, cfg: RefreshConfig, mesh, seed: int) -> None:
        """The state (params of `model` + AdamW) and the jitted step of `loss_fn(model, batch)`."""
        from jaxrl_rm.config import OptimConfig
        from jaxrl_rm.train.state import Trainer, build_train_step, make_optimizer

        self.cfg, self.mesh, self.seed = cfg, mesh, int(seed)
        optim = OptimConfig(learning_rate=cfg.learning_rate, schedule="constant", warmup_steps=0, b2=0.99)
        self.trainer = Trainer(nnx.split(model)[0], make_optimizer(optim, cfg.steps), mesh)
        self.state = self.trainer.init_state(model, seed)
        self._step = build_train_step(self.trainer, loss_fn)
        self.refreshes = 0

    def due(self, step: int) -> bool:
        return (int(step) + 1) % self.cfg.every == 0

    def _keep_recent(self, step: int) -> None:
        """Drop the buffer's entries older than `buffer_steps` policy steps."""
        oldest = int(step) - self.cfg.buffer_steps + 1
        self.buffer = [b for b in self.buffer if b[0] >= oldest]

    def _train(self, rows: dict, *, lengths: np.ndarray, step: int) -> list[float]:
        """`cfg.steps` train steps on batches of `rows` (shuffled, seeded by the policy step;
        `lengths` `[N]` order the length buckets): updates the state, counts the refresh, returns
        the losses."""
        from jaxrl_rm.data.pipeline import BatchStream
        from jaxrl_rm.parallel.rules import shard_batch

        stream = BatchStream(rows, self.cfg.batch_size, seed=self.seed + 7919 * (step + 1), lengths=lengths)
        losses = []
        for k in range(self.cfg.steps):
            self.state, metrics = self._step(self.state, shard_batch(stream.batch(k), self.mesh))
            losses.append(metrics["loss"])
        self.refreshes += 1
        return [float(x) for x in jax.device_get(losses)]


class JudgeRefresher(Refresher):
    """Owns a trainable judge: its state (params + AdamW), the buffer of teacher-labelled
    judgments, and the SFT step that refreshes it.

    model: the judge (`Transformer`); tokenizer: the judge's; template: the `JudgeTemplate` the
    reward renders with; chat_template: whether prompts go through the tokenizer's chat
    template (as the reward renders them); max_length: judge prompt + verdict tokens.
    """

    def __init__(self, model, tokenizer, *, template, cfg: JudgeRefreshConfig, max_length: int, chat_template: bool,
                 mesh, seed: int = 0):
        from jaxrl_rm.train.sft import next_token_loss

        self._init_training(model, lambda m, b: next_token_loss(m, b, mesh=mesh), cfg=cfg, mesh=mesh, seed=seed)
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.chat_template = int(max_length), bool(chat_template)
        self.buffer: list[tuple[int, JudgmentExample, bool]] = []  # (policy step, judgment, judge was wrong)

    @classmethod
    def attach(cls, source, *, key: str, mesh, seed: int) -> "JudgeRefresher":
        """Make `source` (a `type: judge` `JudgeSource` whose options hold `refresh`) a refreshed
        judge: a refresher starting from its model, which its reward then reads."""
        judge = source.judge
        model = judge.model_fn()
        refresher = cls(model, source.tokenizer, template=source.template,
                        cfg=JudgeRefreshConfig.parse(source.refresh_options, key=key),
                        max_length=judge.prompt_budget(model) + judge.max_new_tokens,
                        chat_template=source.chat_template, mesh=mesh, seed=seed)
        judge.model_fn = refresher.model
        source.refresher = refresher
        return refresher

    # ------------------------------------------------------------------ the judge the reward reads
    def model(self):
        return nnx.merge(self.trainer.graphdef, self.state["params"])

    # ------------------------------------------------------------------ data
    def observe(self, step: int, rollouts, labels: np.ndarray, rewards: np.ndarray) -> None:
        """Keep a step's scored rollouts with their teacher labels `[B, G]` bool and whether the
        judge's rewards `[B, G]` disagreed with them; drop judgments older than `buffer_steps`."""
        for i, item in enumerate(rollouts.items):
            reference = item.reference if item.reference is not None else item.answer
            for k, response in enumerate(rollouts.completions[i]):
                if response.strip():
                    label = bool(labels[i, k])
                    self.buffer.append((int(step), JudgmentExample(
                        prompt=item.prompt, response=response, label=label, reference=reference,
                        id=f"{item.id}:{k}:s{step}"), bool(rewards[i, k] > 0.5) != label))
        self._keep_recent(step)

    def examples(self, step: int, unique: list[tuple[JudgmentExample, bool]] | None = None) -> list[JudgmentExample]:
        """The buffer's judgments a refresh trains on: deduplicated by prompt and answer (`unique`:
        `_unique()`, when the caller has it), balanced and corrupted as configured (seeded by the
        policy step)."""
        from jaxrl_rm.train.judge import balance_labels, with_corrupted_answers

        unique = self._unique() if unique is None else unique
        examples = [e for e, _ in unique]
        if self.cfg.balance:
            if len({bool(e.label) for e in examples}) < 2:
                return []  # one kind only: a refresh would teach the judge a constant verdict
            examples = balance_labels(examples, seed=self.seed + step)
        if self.cfg.corrupt > 0:
            examples = with_corrupted_answers(examples, self.cfg.corrupt, p_correct=0.5, seed=self.seed + step)
        return examples + [e for e, wrong in unique if wrong] * self.cfg.mistakes

    def _unique(self) -> list[tuple[JudgmentExample, bool]]:
        """The buffer deduplicated by (prompt, answer), in order: (first judgment, the judge was
        wrong on any copy)."""
        from jaxrl_rm.rewards.judge_source import prompt_as_text

        unique: dict = {}
        for _, e, wrong in self.buffer:
            key = (prompt_as_text(e.prompt), e.response)
            first, was_wrong = unique.get(key, (e, False))
            unique[key] = (first, was_wrong or wrong)
        return list(unique.values())

    # ------------------------------------------------------------------ the update
    def refresh(self, step: int) -> dict[str, float]:
        """`steps` SFT steps of the judge on the buffer -> metrics (`refresh/skipped` 1 when the
        buffer holds nothing to train on: empty, or, with `balance`, one kind of answer only)."""
        from jaxrl_rm.data.pipeline import length_bucket, pad_examples, tokenize_sft
        from jaxrl_rm.train.judge import warmup_records

        unique = self._unique()
        examples = self.examples(step, unique)
        if not examples:
            return {"refresh/skipped": 1.0}
        records = warmup_records(examples, self.template, label_noise=0.0, think=self.cfg.think, seed=self.seed + step)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        tokens = [tokenize_sft(r, self.tokenizer, self.max_length, chat_template=self.chat_template) for r in records]
        # a power-of-two width (or the budget): few distinct shapes across refreshes, few compiles
        width = length_bucket(max(len(ids) for ids, _ in tokens), self.max_length)
        rows = pad_examples(tokens, width, pad)
        losses = self._train(rows, lengths=rows["attention_mask"].sum(1), step=step)
        return {"refresh/loss_first": losses[0], "refresh/loss_last": losses[-1],
                "refresh/examples": float(len(examples)),
                "refresh/mistakes": float(sum(wrong for _, wrong in unique)),
                "refresh/positive": float(np.mean([bool(e.label) for e in examples])),
                "refresh/count": float(self.refreshes)}

    # ------------------------------------------------------------------ checkpointing
    def host_state(self) -> dict:
        return {"refreshes": self.refreshes, "buffer": [[s, e.to_dict(), w] for s, e, w in self.buffer]}

    def restore_host_state(self, host: dict) -> None:
        self.refreshes = int(host.get("refreshes", 0))
        self.buffer = [(int(s), JudgmentExample(**e), bool(w)) for s, e, w in host.get("buffer", [])]


class RMRefresher(Refresher):
    """Owns a trainable scalar RM (a `bt_rm` / `polar_rm` reward's): its state (params + AdamW),
    the buffer of teacher-labelled answers, and the Bradley–Terry step that refreshes it.

    scorer: the source's `RewardScorer` (its graph, builder, lengths and padding are reused; its
    own copy of the weights is dropped: the reward reads the refresher's state)."""

    def __init__(self, scorer, *, cfg: RefreshConfig, mesh, seed: int = 0):
        from jaxrl_rm.rewards.scalar_rm import PolarScorer
        from jaxrl_rm.train.reward_model import pairwise_rm_loss

        self._init_training(nnx.merge(scorer.graphdef, scorer.params), pairwise_rm_loss(), cfg=cfg, mesh=mesh,
                            seed=seed)
        scorer.params = None  # one copy of the weights: the state's
        self.scorer, self.tokenizer = scorer, scorer.tokenizer
        self.polar = isinstance(scorer, PolarScorer)
        # (policy step, prompt, reference, answer, teacher label, the RM's reward)
        self.buffer: list[tuple[int, Any, str, str, bool, float]] = []

    @classmethod
    def attach(cls, source, *, key: str, mesh, seed: int) -> "RMRefresher":
        """Make `source` (a `bt_rm` / `polar_rm` source whose options hold `refresh`) a refreshed
        RM: its reward then scores with the refresher's weights."""
        refresher = cls(source.scorer, cfg=RefreshConfig.parse(source.refresh_options, key=key), mesh=mesh, seed=seed)
        source.params_fn = lambda: refresher.state["params"]
        source.refresher = refresher
        return refresher

    # ------------------------------------------------------------------ data
    def observe(self, step: int, rollouts, labels: np.ndarray, rewards: np.ndarray) -> None:
        """Keep a step's scored rollouts with their teacher labels `[B, G]` bool and the RM's
        rewards `[B, G]`; drop those older than `buffer_steps`."""
        for i, item in enumerate(rollouts.items):
            reference = item.reference if item.reference is not None else item.answer
            for k, response in enumerate(rollouts.completions[i]):
                self.buffer.append((int(step), item.prompt, reference, response, bool(labels[i, k]),
                                    float(rewards[i, k])))
        self._keep_recent(step)

    def pairs(self) -> list[tuple[Any, bool]]:
        """[(record, the RM mis-ordered it)]: every (right ≻ wrong) pair of answers to the same
        prompt in the buffer, each distinct answer once (its latest reward), as `PreferencePair`s
        (BT) or `RankedTriple`s with the gold reference (POLAR)."""
        from jaxrl_rm.data.records import PreferencePair, RankedTriple
        from jaxrl_rm.rewards.judge_source import prompt_as_text

        groups: dict = {}
        for _, prompt, reference, response, label, reward in self.buffer:
            g = groups.setdefault(prompt_as_text(prompt), (prompt, reference, {}))
            g[2][response] = (label, reward)
        out = []
        for prompt, reference, answers in groups.values():
            right = [(a, r) for a, (label, r) in answers.items() if label]
            wrong = [(a, r) for a, (label, r) in answers.items() if not label]
            for chosen, r_chosen in right:
                for rejected, r_rejected in wrong:
                    record = (RankedTriple(prompt=prompt, reference=reference, chosen=chosen, rejected=rejected)
                              if self.polar else PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected))
                    out.append((record, r_chosen <= r_rejected))
        return out

    # ------------------------------------------------------------------ the update
    def refresh(self, step: int) -> dict[str, float]:
        """`steps` BT steps of the RM on the buffer's pairs -> metrics (`refresh/skipped` 1 when
        no prompt in the buffer has both a right and a wrong answer)."""
        from jaxrl_rm.data.pipeline import length_bucket
        from jaxrl_rm.train.reward_model import pair_rows, pair_sequences

        pairs = self.pairs()
        if not pairs:
            return {"refresh/skipped": 1.0}
        records = [r for r, _ in pairs] + [r for r, wrong in pairs if wrong] * self.cfg.mistakes
        chosen, rejected = pair_sequences(records, self.scorer.builder)
        # a power-of-two width (or the budget): few distinct shapes across refreshes, few compiles
        width = length_bucket(max(len(x) for x, _ in chosen + rejected), self.scorer.max_length)
        rows = pair_rows(chosen, rejected, length=width, pad_id=self.scorer.pad_id)
        used = np.maximum(rows["chosen_attention_mask"].sum(1), rows["rejected_attention_mask"].sum(1))
        losses = self._train(rows, lengths=used, step=step)
        return {"refresh/loss_first": losses[0], "refresh/loss_last": losses[-1],
                "refresh/examples": float(len(records)), "refresh/mistakes": float(sum(w for _, w in pairs)),
                "refresh/count": float(self.refreshes)}

    # ------------------------------------------------------------------ checkpointing
    def host_state(self) -> dict:
        return {"refreshes": self.refreshes, "buffer": [list(b) for b in self.buffer]}

    def restore_host_state(self, host: dict) -> None:
        self.refreshes = int(host.get("refreshes", 0))
        self.buffer = [(int(s), p, ref, a, bool(label), float(r)) for s, p, ref, a, label, r in host.get("buffer", [])]
