"""Reward sources: one interface for everything that scores rollouts.

A `RewardSource` is called with the step's `Rollouts` (B prompts x G completions) and returns
`(rewards [B, G] float32, metrics)`. Verifiers, scalar RMs, POLAR, generative judges and the
policy judging itself all implement it, so the GRPO loop never knows which one it is using.
Sources are built from config (`RewardSpec`) through `REGISTRY`; model-backed sources register
themselves from their own modules (`register("bt_rm", factory)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from jaxrl_rm.data.records import PromptItem


@dataclasses.dataclass
class Rollouts:
    """The step's samples. B prompts, G completions each, T = max new tokens.

    completion_ids / completion_mask: `[B, G, T]`; lengths `[B, G]`; truncated `[B, G]` bool
    (stopped by the length limit, not by a stop token).
    """

    items: list[PromptItem]
    prompt_texts: list[str]
    completions: list[list[str]]
    completion_ids: np.ndarray
    completion_mask: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.items), len(self.completions[0]) if self.completions else 0

    def subset(self, rows: Sequence[int]) -> "Rollouts":
        rows = list(rows)
        return Rollouts(items=[self.items[i] for i in rows], prompt_texts=[self.prompt_texts[i] for i in rows],
                        completions=[self.completions[i] for i in rows],
                        completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
                        lengths=self.lengths[rows], truncated=self.truncated[rows])


class RewardSource(Protocol):
    name: str

    def __call__(self, rollouts: Rollouts) -> tuple[np.ndarray, dict]:
        """-> rewards `[B, G]` float32, metrics (scalars)."""


# --- rule-based sources -----------------------------------------------------------------------
def verify_rollouts(verifier, rollouts: Rollouts):
    """`verifier` on every completion of `rollouts` (row-major, `B * G`) against its item's gold
    answer, with its item's prompt (the prompt-echo guard reads it; a path check reads its
    constraints there). -> the verifier's `VerifierOutput`."""
    g = rollouts.shape[1]
    return verifier([c for row in rollouts.completions for c in row],
                    [item.answer for item in rollouts.items for _ in range(g)],
                    prompts=[item.prompt if isinstance(item.prompt, str) else "" for item in rollouts.items
                             for _ in range(g)])


class VerifierSource:
    """A rule verifier as a reward: `kind` is its reward type (`VERIFIER_REWARDS`: math-verify or
    exact match against `item.answer`, guards on by default; `path_check`: the constraints the
    prompt states)."""

    #: The source's default name (its metrics' key) per reward type.
    NAMES = {"verifier": "verifier_math", "exact_match": "verifier_exact", "path_check": "verifier_path"}

    def __init__(self, kind: str = "verifier", *, name: str | None = None, **options):
        from jaxrl_rm.rewards.verifiers import make_verifier

        self.name = name or self.NAMES[kind]
        self.verifier = make_verifier(kind, **options)

    def __call__(self, rollouts: Rollouts):
        b, g = rollouts.shape
        out = verify_rollouts(self.verifier, rollouts)
        reasons = [r.reason for r in out.results]
        rewards = np.asarray(out.rewards, np.float32).reshape(b, g)
        metrics = {"correct": float(np.mean(rewards > 0))}
        for reason in sorted(set(reasons)):
            metrics[f"reason/{reason}"] = reasons.count(reason) / len(reasons)
        return rewards, metrics

    def guard_report(self) -> dict[str, int]:
        """How often each reward-hacking guard fired so far (summary's `reward_guard`)."""
        return self.verifier.guard_report()


class RankingSource:
    """URPO preference-as-ranking: parse each ranking judgment with its task's template and reward
    Kendall τ vs the gold scores (`mapping` raw | unit; an invalid judgment earns `invalid_reward`,
    default the lowest reward).

    The template is `judges.ranking_template` of the item's task (`options.template`, default
    URPO's `listwise` `\\boxed{s1, …, sN}`, with `options.template_options`, e.g. `max_score`): the
    same object that rendered the ranking prompt parses the answer. `tasks`: TaskSpecs by name (the
    GRPO run's); an item of a task not in it is parsed with the default `listwise` template.
    Metrics: `invalid_rate`; of the valid rankings, `top1` (the one highest score is on a gold-best
    response) and `all_tied_rate` (every response given the same score: τ = 0 whatever the gold,
    where a judge that cannot rank settles under GRPO).
    """

    def __init__(self, *, name: str = "ranking", mapping: str = "raw", invalid_reward: float | None = None,
                 tasks: dict | None = None):
        self.name, self.mapping, self.invalid_reward = name, mapping, invalid_reward
        self.tasks = dict(tasks or {})

    def template_for(self, task: str):
        from jaxrl_rm.rewards.judges import get_template, ranking_template

        spec = self.tasks.get(task)
        return get_template("listwise") if spec is None else ranking_template(spec)

    def __call__(self, rollouts: Rollouts):
        from jaxrl_rm.rewards.judgment import kendall_tau_reward

        b, g = rollouts.shape
        rewards = np.zeros((b, g), np.float32)
        invalid = top1 = tied = 0
        for i, item in enumerate(rollouts.items):
            n, template = len(item.gold_scores), self.template_for(item.task)
            results = [template.parse(text, n) for text in rollouts.completions[i]]
            invalid += sum(not r.valid for r in results)
            rewards[i] = kendall_tau_reward(results, [item.gold_scores] * g, mapping=self.mapping,
                                            invalid_reward=self.invalid_reward)
            gold = np.asarray(item.gold_scores, np.float64)
            for r in results:
                if r.valid:
                    scores = np.asarray(r.value, np.float64)
                    tied += bool(np.all(scores == scores[0]))
                    top = np.flatnonzero(scores == scores.max())
                    top1 += len(top) == 1 and gold[top[0]] == gold.max()
        valid = b * g - invalid
        return rewards, {"invalid_rate": invalid / max(b * g, 1), "top1": top1 / max(valid, 1),
                         "all_tied_rate": tied / max(valid, 1)}


class HiddenQualitySource:
    """The miniature world's hidden scoring function as a reward (`jaxrl_rm.data.synthetic.
    hidden_quality`, in [0, 1]) of each completion to its item's prompt: the oracle reward of the
    open-ended task (an oracle-RL baseline) and its evaluation measure (`options.eval_scorer`).
    Metrics: the mean of each score component."""

    def __init__(self, *, name: str = "hidden_quality"):
        from jaxrl_rm.data.synthetic import HIDDEN_SCORE

        self.name, self.score = name, HIDDEN_SCORE

    def __call__(self, rollouts: Rollouts):
        b, g = rollouts.shape
        parts = [[self.score.components(item.prompt, c) for c in row]
                 for item, row in zip(rollouts.items, rollouts.completions)]
        rewards = np.asarray([[self.score.total(p) for p in row] for row in parts], np.float32).reshape(b, g)
        flat = [p for row in parts for p in row]
        return rewards, {k: float(np.mean([p[k] for p in flat])) for k, _ in self.score.weights} if flat else {}


class EnsembleSource:
    """`type: ensemble`: several reward sources scored on the same rollouts, reduced per rollout.

    `reduce: mean` averages the members' rewards (less noise from any one judge); `reduce: min`
    gives each rollout its least convinced member's reward, so a policy has to fool every member
    at once to be paid for a hack one of them falls for. Members are reward specs
    (`{type, path, options}`, weight ignored), built as any task reward is; rewards `[B, G]`.
    Metrics: each member's mean and metrics under `m<i>_<member name>/...`, and `disagreement`,
    the mean over rollouts of (max - min) member reward."""

    def __init__(self, members: list, *, reduce: str = "mean", name: str = "ensemble"):
        if reduce not in ("mean", "min"):
            raise ValueError(f"reward type ensemble: reduce must be 'mean' or 'min', got {reduce!r}")
        if len(members) < 2:
            raise ValueError(f"reward type ensemble: needs at least 2 members, got {len(members)}")
        self.members, self.reduce, self.name = list(members), reduce, name

    def __call__(self, rollouts: Rollouts):
        stacked, metrics = [], {}
        for i, member in enumerate(self.members):
            r, m = member(rollouts)
            r = np.asarray(r, np.float32)
            stacked.append(r)
            metrics[f"m{i}_{member.name}/mean"] = float(r.mean())
            metrics.update({f"m{i}_{member.name}/{k}": v for k, v in m.items()})
        stacked = np.stack(stacked)  # [M, B, G]
        reduced = stacked.min(0) if self.reduce == "min" else stacked.mean(0)
        metrics["disagreement"] = float((stacked.max(0) - stacked.min(0)).mean())
        return reduced.astype(np.float32), metrics

    def for_eval(self) -> "EnsembleSource":
        return EnsembleSource([for_eval(m) for m in self.members], reduce=self.reduce, name=self.name)


def _ensemble_source(spec, ctx: dict) -> EnsembleSource:
    """`type: ensemble`, options `{members: [reward spec, ...], reduce: mean | min, name}`."""
    from jaxrl_rm.config import RewardSpec

    opts = dict(spec.options)
    unknown = sorted(set(opts) - {"members", "reduce", "name"})
    if unknown:
        raise ValueError(f"reward type ensemble: unknown option(s) {unknown}; valid: ['members', 'reduce', 'name']")
    members = []
    for i, m in enumerate(opts.get("members") or []):
        if not isinstance(m, dict) or "type" not in m:
            raise ValueError(f"reward type ensemble: options.members[{i}] must be a reward spec with a `type`, got {m!r}")
        bad = sorted(set(m) - {"type", "path", "options", "weight"})
        if bad:
            raise ValueError(f"reward type ensemble: options.members[{i}] has unknown key(s) {bad}")
        if m["type"] == "ensemble":
            raise ValueError(f"reward type ensemble: options.members[{i}] is itself an ensemble")
        members.append(build_source(RewardSpec(type=m["type"], path=m.get("path", ""),
                                               options=dict(m.get("options") or {})), ctx))
    return EnsembleSource(members, reduce=opts.get("reduce", "mean"), name=opts.get("name", "ensemble"))


# --- registry ---------------------------------------------------------------------------------
Factory = Callable[..., RewardSource]
#: Reward types computed by rules from gold data (no model): the others are what monitors watch.
#: Reward types that are rule verifiers (`rewards.verifiers.VERIFIERS`): they give a verifiable
#: task's correctness.
VERIFIER_REWARDS = tuple(VerifierSource.NAMES)
RULE_REWARDS = (*VERIFIER_REWARDS, "ranking", "hidden_quality")


def _ranking_source(spec, ctx: dict) -> RankingSource:
    """`type: ranking` — parses with the templates of the GRPO run's tasks (`ctx["grpo"].tasks`)."""
    opts, valid = dict(spec.options), ("name", "mapping", "invalid_reward")
    moved = sorted(set(opts) & {"min_score", "max_score", "integer", "require_reasoning"})
    if moved:
        raise ValueError(f"reward type ranking: option(s) {moved} belong to the task's template: set them in "
                         "grpo.tasks[].options.template_options (the template that renders the ranking prompt "
                         "also parses the answer)")
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"reward type ranking: unknown option(s) {unknown}; valid: {list(valid)}")
    return RankingSource(tasks=getattr(ctx.get("grpo"), "tasks", None), **opts)


REGISTRY: dict[str, Factory] = {
    **{kind: (lambda spec, ctx: VerifierSource(spec.type, **spec.options)) for kind in VERIFIER_REWARDS},
    "ranking": _ranking_source,
    "hidden_quality": lambda spec, ctx: HiddenQualitySource(**spec.options),
    "ensemble": _ensemble_source,
}
#: Rule rewards that can measure a non-verifiable task's greedy eval answers (`options.eval_scorer`).
EVAL_SCORERS = ("hidden_quality",)


def register(kind: str, factory: Factory) -> None:
    """Make `type: <kind>` available in `grpo.tasks[].rewards` configs. factory(spec, ctx)."""
    REGISTRY[kind] = factory


def build_source(spec, ctx: dict) -> RewardSource:
    """`spec`: RewardSpec (type, weight, path, options); ctx: shared objects (policy, tokenizer, mesh)."""
    if spec.type not in REGISTRY:
        _load_builtin_sources()
    if spec.type not in REGISTRY:
        raise ValueError(f"unknown reward type {spec.type!r}; available: {sorted(REGISTRY)}")
    return REGISTRY[spec.type](spec, ctx)


def _load_builtin_sources() -> None:
    """Model-backed sources register on import; import them lazily (they pull in models)."""
    import importlib

    for module in ("jaxrl_rm.rewards.scalar_rm", "jaxrl_rm.rewards.judge_source"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def for_eval(source: RewardSource) -> RewardSource:
    """The source as evaluation uses it: its `for_eval()` view where it has one (a generative judge
    judges greedily there: `judge_source.JudgeSource.for_eval`), else the source itself."""
    view = getattr(source, "for_eval", None)
    return view() if callable(view) else source


def combine(weighted: Sequence[tuple[RewardSource, float]], rollouts: Rollouts,
            parts: dict | None = None) -> tuple[np.ndarray, dict]:
    """Σ weight · source(rollouts) -> rewards `[B, G]` float32 and metrics prefixed by source name.
    `parts`, when given, receives each source's unweighted rewards by name (for monitors)."""
    b, g = rollouts.shape
    total = np.zeros((b, g), np.float32)
    metrics: dict[str, float] = {}
    for source, weight in weighted:
        r, m = source(rollouts)
        r = np.asarray(r, np.float32)
        if r.shape != (b, g):
            raise ValueError(f"reward source {source.name!r} returned shape {r.shape}, expected {(b, g)}")
        total += weight * r
        if parts is not None:
            parts[source.name] = r
        metrics[f"{source.name}/mean"] = float(r.mean())
        metrics.update({f"{source.name}/{k}": v for k, v in m.items()})
    return total, metrics
