"""Rewards for training a judge (J1 / RLLM / URPO referee) from its parsed outputs.

Every function takes :class:`~jaxrl_rm.rewards.parsers.ParseResult` objects (one per judge
rollout) plus labels, and returns ``rewards: [n] float32`` (numpy). An invalid parse earns
``invalid_reward``; pass a :class:`~jaxrl_rm.rewards.guards.GuardCounter` as ``counter`` to count
guard hits (``master_key``, ``empty``, ``no_reasoning``) for the run summary.

* :func:`score_match_reward` — J1/RLLM: 1 when the predicted score equals the teacher score
  (optionally within ``tolerance``), else 0.
* :func:`verdict_reward` — 1 when the pairwise verdict equals the gold verdict.
* :func:`position_consistency_reward` — 1 only when the judge is right for a pair in *both*
  presentation orders (A/B and B/A in the same batch).
* :func:`kendall_tau_reward` — URPO listwise: Kendall τ of the predicted scores vs the gold
  ranking, mapped to ``raw`` [-1, 1] or ``unit`` [0, 1].
* :func:`format_reward`, :func:`apply_format_penalty` — a bonus / penalty for the format alone.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from jaxrl_rm.rewards.guards import GuardCounter
from jaxrl_rm.rewards.parsers import ParseResult, verdict_from_scores
from jaxrl_rm.rewards.ranking import TauMapping, kendall_tau, tau_reward_range, tau_to_reward


def _count(results: Sequence[ParseResult], counter: GuardCounter | None) -> None:
    if counter is not None:
        counter.update(results)


def _check_len(name: str, results: Sequence[Any], labels: Sequence[Any]) -> None:
    if len(results) != len(labels):
        raise ValueError(f"{name}: {len(results)} results but {len(labels)} labels")


def score_match_reward(
    results: Sequence[ParseResult],
    teacher_scores: Sequence[float] | np.ndarray,
    *,
    tolerance: float = 0.0,
    invalid_reward: float = 0.0,
    counter: GuardCounter | None = None,
) -> np.ndarray:
    """J1 / RLLM judge reward: ``1`` if ``|predicted − teacher| <= tolerance`` else ``0``.

    Args:
      results: pointwise parse results ``[n]`` (``value`` a float).
      teacher_scores: ``[n]`` teacher / label scores (e.g. 1 = correct, 0 = incorrect).
      tolerance: allowed absolute difference (0 = exact match).
      invalid_reward: reward of an invalid parse.

    Returns: ``[n] float32``.

    >>> from jaxrl_rm.rewards.parsers import parse_pointwise
    >>> rs = [parse_pointwise("<think>wrong sum</think><score>0</score>"), parse_pointwise(":")]
    >>> score_match_reward(rs, [0, 0]).tolist()
    [1.0, 0.0]
    """
    teacher = np.asarray(teacher_scores, dtype=np.float64).reshape(-1)
    _check_len("score_match_reward", results, teacher)
    _count(results, counter)
    out = np.full(len(results), invalid_reward, dtype=np.float32)
    for i, r in enumerate(results):
        if r.valid and r.value is not None:
            out[i] = 1.0 if abs(float(r.value) - teacher[i]) <= tolerance else 0.0
    return out


def _as_verdict(r: ParseResult, labels: tuple[str, str]) -> ParseResult:
    if r.valid and isinstance(r.value, tuple):  # pairwise-scores result
        return verdict_from_scores(r, labels)
    return r


def verdict_reward(
    results: Sequence[ParseResult],
    gold_verdicts: Sequence[str],
    *,
    invalid_reward: float = 0.0,
    labels: tuple[str, str] = ("A", "B"),
    counter: GuardCounter | None = None,
) -> np.ndarray:
    """Pairwise judge reward: ``1`` if the verdict equals the gold verdict (``"A"``/``"B"``), else 0.

    ``results`` may be verdict results (:func:`parse_pairwise`) or pairwise-score results
    (:func:`parse_pairwise_scores`; the higher score is the verdict, a tie earns 0).
    Returns ``[n] float32``.
    """
    _check_len("verdict_reward", results, gold_verdicts)
    _count(results, counter)
    out = np.full(len(results), invalid_reward, dtype=np.float32)
    for i, r in enumerate(results):
        v = _as_verdict(r, labels)
        if v.valid:
            out[i] = 1.0 if v.value == gold_verdicts[i] else 0.0
        elif v.reason == "tie":
            out[i] = 0.0
    return out


def position_consistency_reward(
    correct: Sequence[float] | np.ndarray,
    pair_ids: Sequence[Any],
    swapped: Sequence[bool] | np.ndarray,
    *,
    reduce: Literal["mean", "all", "any"] = "mean",
) -> np.ndarray:
    """Reward a judge only for verdicts that are right in both presentation orders.

    The batch holds judge rollouts for pairs shown as (A=x, B=y) (``swapped=False``) and as
    (A=y, B=x) (``swapped=True``); ``pair_ids`` says which pair each rollout judged, and
    ``correct`` (e.g. from :func:`verdict_reward`, whose gold verdict already accounts for the
    swap) says whether it was right. The reward of rollout ``i`` is::

        correct[i] * reduce({correct[j] : pair_ids[j] == pair_ids[i], swapped[j] != swapped[i]})

    ``reduce="mean"`` (default) is the probability that ``i`` and a random rollout of the other
    order are both right; ``"all"`` / ``"any"`` are stricter / looser. With one rollout per
    order it is simply ``correct_ab and correct_ba``. Every pair must appear in both orders
    (a ``ValueError`` otherwise: that is a batch-construction bug). Returns ``[n] float32``.

    >>> position_consistency_reward([1, 1, 1, 0], ["p", "p", "q", "q"], [False, True, False, True]).tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    if reduce not in ("mean", "all", "any"):
        raise ValueError(f"reduce must be 'mean', 'all' or 'any', got {reduce!r}")
    c = np.asarray(correct, dtype=np.float32).reshape(-1)
    sw = np.asarray(swapped, dtype=bool).reshape(-1)
    if not (len(c) == len(sw) == len(pair_ids)):
        raise ValueError(
            f"position_consistency_reward: lengths differ (correct {len(c)}, pair_ids {len(pair_ids)}, swapped {len(sw)})"
        )
    groups: dict[tuple[Any, bool], list[int]] = {}
    for i, pid in enumerate(pair_ids):
        groups.setdefault((pid, bool(sw[i])), []).append(i)
    out = np.zeros(len(c), dtype=np.float32)
    for i, pid in enumerate(pair_ids):
        other = groups.get((pid, not bool(sw[i])))
        if not other:
            raise ValueError(f"position_consistency_reward: pair {pid!r} has no rollout in the other order")
        oc = c[other]
        agg = oc.mean() if reduce == "mean" else (oc.min() if reduce == "all" else oc.max())
        out[i] = c[i] * agg
    return out


def kendall_tau_reward(
    results: Sequence[ParseResult],
    gold: Sequence[Sequence[float]] | np.ndarray,
    *,
    mapping: TauMapping = "raw",
    invalid_reward: float | None = None,
    counter: GuardCounter | None = None,
) -> np.ndarray:
    """URPO listwise judge reward: Kendall τ of the parsed scores vs the gold ranking.

    Args:
      results: listwise parse results ``[n]`` (``value`` a tuple of N_i scores).
      gold: ``[n]`` gold score vectors (higher = better), ``len(gold[i]) == N_i``.
      mapping: ``"raw"`` → τ in [-1, 1]; ``"unit"`` → (τ + 1) / 2 in [0, 1].
      invalid_reward: reward of an invalid parse or a count mismatch; default (None) is the
        *lowest* reward of the mapping (-1 raw, 0 unit), so that garbage never beats a wrong
        ranking. (A judge that ties everything earns τ = 0.)

    Returns: ``[n] float32``.
    """
    _check_len("kendall_tau_reward", results, gold)
    _count(results, counter)
    if invalid_reward is None:
        invalid_reward = tau_reward_range(mapping)[0]
    out = np.full(len(results), invalid_reward, dtype=np.float32)
    for i, r in enumerate(results):
        g = np.asarray(gold[i], dtype=np.float32).reshape(-1)
        if r.valid and r.value is not None and len(r.value) == len(g):
            out[i] = float(tau_to_reward(kendall_tau(np.asarray(r.value, dtype=np.float32), g), mapping))
    return out


def format_reward(
    results: Sequence[ParseResult],
    *,
    valid_reward: float = 0.0,
    invalid_reward: float = -1.0,
    counter: GuardCounter | None = None,
) -> np.ndarray:
    """Reward for the format alone: ``valid_reward`` when the output parsed, else ``invalid_reward``.

    Add it to a task reward (with a weight) to penalise unparseable judgments. ``[n] float32``.
    """
    _count(results, counter)
    return np.asarray([valid_reward if r.valid else invalid_reward for r in results], dtype=np.float32)


def apply_format_penalty(rewards: Any, results: Sequence[ParseResult], penalty: float = -1.0) -> np.ndarray:
    """Replace the reward of every invalid output by ``penalty``. ``[n] float32``."""
    r = np.asarray(rewards, dtype=np.float32).copy().reshape(-1)
    _check_len("apply_format_penalty", results, r)
    for i, res in enumerate(results):
        if not res.valid:
            r[i] = penalty
    return r


def scores_to_rewards(results: Sequence[ParseResult], n: int, *, invalid_reward: float = 0.0) -> np.ndarray:
    """URPO self-rewarding: a valid listwise judgment of G responses gives their rewards directly.

    ``results`` are the judge's outputs for one group (usually one); the per-response rewards are
    the mean of the valid score vectors, or ``invalid_reward`` for all if none is valid.
    Returns ``[n] float32``.
    """
    vals = [np.asarray(r.value, dtype=np.float32) for r in results if r.valid and r.value is not None and len(r.value) == n]
    if not vals:
        return np.full(n, invalid_reward, dtype=np.float32)
    return np.mean(np.stack(vals), axis=0).astype(np.float32)
