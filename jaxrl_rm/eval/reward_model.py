"""Reward-model evaluation: pairwise accuracy (overall and per subset), for BT and POLAR RMs.

Accuracy is the share of pairs whose preferred item scores strictly higher (ties count as wrong,
as in `objectives.bradley_terry_loss`'s `accuracy`). For POLAR, "pairs" are
  - ranked triples: r(p, reference, chosen) vs r(p, reference, rejected)  (judge-preferred above the other),
  - pretraining quads: r(p, a1, a2) vs r(p, a1, b1)  (policy-discrimination accuracy).

Pure host functions on score arrays (`pairwise_accuracy`), and helpers that score records with a
`jaxrl_rm.rewards.scalar_rm` scorer (`bt_pair_accuracy`, `polar_triple_accuracy`,
`polar_quad_accuracy`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def pairwise_accuracy(r_chosen, r_rejected, *, subsets: Sequence[str | None] | None = None,
                      prefix: str = "") -> dict[str, float]:
    """Metrics of N scored pairs.

    r_chosen, r_rejected: `[N]` rewards of the preferred / dispreferred item.
    subsets: optional `[N]` subset names (None = no subset); adds `accuracy/<subset>` and `count/<subset>`.
    Returns `{prefix}accuracy`, `{prefix}loss` (mean BT loss -log σ(r_c - r_r)), `{prefix}margin_mean`,
    `{prefix}tie_rate`, `{prefix}count`, and per-subset entries. Empty input: accuracy 0, count 0.
    """
    rc = np.asarray(r_chosen, np.float64).reshape(-1)
    rr = np.asarray(r_rejected, np.float64).reshape(-1)
    if rc.shape != rr.shape:
        raise ValueError(f"r_chosen {rc.shape} and r_rejected {rr.shape} differ in shape")
    n = rc.shape[0]
    diff = rc - rr
    correct = diff > 0
    out = {
        f"{prefix}accuracy": float(correct.mean()) if n else 0.0,
        f"{prefix}loss": float(-_log_sigmoid(diff).mean()) if n else 0.0,
        f"{prefix}margin_mean": float(diff.mean()) if n else 0.0,
        f"{prefix}tie_rate": float((diff == 0).mean()) if n else 0.0,
        f"{prefix}count": int(n),
    }
    if subsets is not None:
        if len(subsets) != n:
            raise ValueError(f"subsets has {len(subsets)} entries for {n} pairs")
        names = np.asarray([s if s is not None else "" for s in subsets], dtype=object)
        for name in sorted({s for s in names if s}):
            sel = names == name
            out[f"{prefix}accuracy/{name}"] = float(correct[sel].mean())
            out[f"{prefix}count/{name}"] = int(sel.sum())
    return out


def bt_pair_accuracy(scorer, pairs, *, prefix: str = "", params=None) -> dict[str, float]:
    """`PreferencePair`s scored by a `BTScorer`: accuracy of r(p, chosen) > r(p, rejected), per subset."""
    pairs = list(pairs)
    prompts = [p.prompt for p in pairs]
    rc = scorer.score(prompts, [p.chosen for p in pairs], params=params)
    rr = scorer.score(prompts, [p.rejected for p in pairs], params=params)
    subsets = [getattr(p, "subset", None) for p in pairs]
    return pairwise_accuracy(rc, rr, subsets=subsets if any(subsets) else None, prefix=prefix)


def polar_triple_accuracy(scorer, triples, *, prefix: str = "", params=None) -> dict[str, float]:
    """`RankedTriple`s scored by a `PolarScorer`: how often the judge-preferred candidate scores
    above the other given the reference, r(p, ref, chosen) > r(p, ref, rejected)."""
    triples = list(triples)
    prompts, refs = [t.prompt for t in triples], [t.reference for t in triples]
    rc = scorer.score(prompts, refs, [t.chosen for t in triples], params=params)
    rr = scorer.score(prompts, refs, [t.rejected for t in triples], params=params)
    return pairwise_accuracy(rc, rr, prefix=prefix)


def polar_quad_accuracy(scorer, quads, *, prefix: str = "policy_discrimination_", params=None) -> dict[str, float]:
    """`PolarQuad`s scored by a `PolarScorer`: share with r(p, a1, a2) > r(p, a1, b1) (the RM
    recognises the candidate from the reference's own policy). Per-policy-pair subsets are not
    reported; group quads yourself and call `pairwise_accuracy` for that."""
    quads = list(quads)
    prompts, refs = [q.prompt for q in quads], [q.a1 for q in quads]
    rs = scorer.score(prompts, refs, [q.a2 for q in quads], params=params)
    ro = scorer.score(prompts, refs, [q.b1 for q in quads], params=params)
    return pairwise_accuracy(rs, ro, prefix=prefix)
