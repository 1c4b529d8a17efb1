"""Judge evaluation: pointwise judgment accuracy on labelled sets, gold-vs-near-miss AUC on
problems with gold answers, pairwise accuracy with position consistency.

A *judge* here is any callable ``judge(prompt_texts: list[str]) -> list[str]`` that returns one
output per rendered judge prompt: a model (``jaxrl_rm.rewards.judge_source.TextJudge(...,
greedy=True)``) or a scripted function (tests). Prompts are rendered with the same templates the
reward sources and the J1 trainer use (:mod:`jaxrl_rm.rewards.judges`), outputs are parsed by the
template's never-raising parser; an invalid output counts as a wrong judgment.

Pointwise (``evaluate_pointwise``) on ``JudgmentExample``-like records (``prompt``, ``response``,
``label``, optional ``reference``): the target score is the label (``True``/``False`` -> the
template's max / min score). Metrics: ``accuracy`` (invalid = wrong), ``invalid_rate``,
``accuracy_valid`` (among valid outputs), ``accuracy/label_<t>`` and ``count/label_<t>`` per
target ``t``, ``balanced_accuracy`` (mean of those), ``mean_prediction`` (of the valid outputs;
absent when none is valid), ``count``.

Pairwise (``evaluate_pairwise``) on ``PreferencePair``-like records (``prompt``, ``chosen``,
``rejected``, optional ``subset``): each pair is judged in both orders, (A=chosen, B=rejected)
and (A=rejected, B=chosen). Metrics: ``accuracy`` (over the 2n judgments; invalid and ties
wrong), ``consistent_accuracy`` (right in both orders), ``position_consistency`` (of the pairs with
two valid non-tie verdicts, the share whose winner is the same in both orders),
``position_bias_rate`` (1 − that), ``a_rate`` (share of valid non-tie verdicts that say A),
``invalid_rate``, ``tie_rate``, ``count`` (pairs), and ``accuracy/<subset>``.

Near misses (``evaluate_near_miss``; pieces :func:`near_miss_answers`, :func:`near_miss_prompts`,
:func:`near_miss_metrics`, :func:`near_miss_auc`) on held-out problems with gold answers: each
problem's gold answer and ``k`` one-edit near misses (:func:`jaxrl_rm.data.synthetic.corrupt_answer`,
seeded) are scored by the judge one at a time, as a pointwise reward source would score a group of
rollouts. ``auc`` is the mean over problems of P(score(gold) > score(miss)), a tie counting 1/2:
GRPO uses only the order of the rewards within a group (its advantages are group-relative), so a
judge is useful to it exactly when it ranks the right answer above answers one edit away from it.
Balanced accuracy on the policy's answers does not show that: a judge that learns which answers the
policy tends to get wrong (their length, their look) scores well there and still calls a near miss
as correct as the gold answer (AUC 0.5). Metrics: ``auc``, ``gold_score`` / ``miss_score`` (mean
normalised score in [0, 1] of the gold answers / the misses), ``invalid_rate``, ``count``
(problems). An unparseable verdict scores the template's minimum (the reward a pointwise judge
reward source gives it, ``invalid_reward`` 0), so it ties with a valid lowest verdict and loses to
anything above it.

Data builders: :func:`gsm8k_pairs` (correct vs incorrect solutions of one GSM8K question from
``load_gsm8k_solutions``) and :func:`alpaca_eval_pairs` (a generator's answer vs the baseline's,
preferred side by the AlpacaEval judge's annotation).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from jaxrl_rm.rewards.judge_source import label_score, pairwise_outcome, prompt_as_text
from jaxrl_rm.rewards.judges import JudgeTemplate, get_template

Judge = Callable[[list], list]


def _template(template: str | JudgeTemplate, **options) -> JudgeTemplate:
    return template if isinstance(template, JudgeTemplate) else get_template(template, **options)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# ============================================================================ pointwise


def pointwise_prompts(examples: Sequence[Any], template: str | JudgeTemplate = "pointwise_correctness",
                      tokenizer=None) -> list[str]:
    """Rendered judge prompts for labelled examples (the reference is shown by ``*_ref`` templates)."""
    tpl = _template(template)
    out = []
    for ex in examples:
        extra = {"reference": ex.reference} if tpl.uses_reference else {}
        out.append(tpl.render(tokenizer, prompt=prompt_as_text(ex.prompt), response=ex.response, **extra))
    return out


def pointwise_metrics(examples: Sequence[Any], outputs: Sequence[str],
                      template: str | JudgeTemplate = "pointwise_correctness", *, tolerance: float = 0.0) -> dict:
    """Accuracy of judge ``outputs`` (one per example) against the examples' labels (see module docstring)."""
    tpl = _template(template)
    if len(outputs) != len(examples):
        raise ValueError(f"pointwise_metrics: {len(outputs)} outputs for {len(examples)} examples")
    n = len(examples)
    if n == 0:
        return {"accuracy": float("nan"), "count": 0}
    targets = np.asarray([label_score(ex.label, tpl) for ex in examples], np.float64)
    results = [tpl.parse(o) for o in outputs]
    valid = np.asarray([r.valid for r in results])
    pred = np.asarray([float(r.value) if r.valid else np.nan for r in results])
    correct = valid & (np.abs(np.nan_to_num(pred, nan=np.inf) - targets) <= tolerance)
    out = {"accuracy": float(correct.mean()), "invalid_rate": float(1 - valid.mean()),
           "accuracy_valid": float(correct[valid].mean()) if valid.any() else 0.0, "count": n}
    if valid.any():
        out["mean_prediction"] = float(np.nanmean(pred))
    per_class = []
    for t in sorted(set(targets.tolist())):
        sel = targets == t
        acc = float(correct[sel].mean())
        out[f"accuracy/label_{_fmt(t)}"] = acc
        out[f"count/label_{_fmt(t)}"] = int(sel.sum())
        per_class.append(acc)
    out["balanced_accuracy"] = float(np.mean(per_class))
    return out


def evaluate_pointwise(judge: Judge, examples: Sequence[Any], *, template: str | JudgeTemplate = "pointwise_correctness",
                       tokenizer=None, tolerance: float = 0.0, batch_size: int = 256) -> dict:
    """Judge every example once (``judge(texts)``) and score it: :func:`pointwise_metrics`."""
    texts = pointwise_prompts(examples, template, tokenizer)
    outputs: list[str] = []
    for s in range(0, len(texts), batch_size):
        outputs += list(judge(texts[s:s + batch_size]))
    return pointwise_metrics(examples, outputs, template, tolerance=tolerance)


# ============================================================================ near misses


def _gold(problem: Any) -> str:
    """The gold answer of a ``VerifiableProblem`` (``answer``) or a ``JudgmentExample`` (``reference``)."""
    gold = getattr(problem, "answer", None)
    if gold is None:
        gold = getattr(problem, "reference", None)
    if not gold:
        raise ValueError(f"near misses need a gold answer (`answer` or `reference`): {problem!r}")
    return str(gold)


def near_miss_answers(problems: Sequence[Any], num_misses: int = 4, *, seed: int = 0,
                      alphabet: str | None = None) -> list[list[str]]:
    """``num_misses`` one-edit near misses of each problem's gold answer: ``[len(problems)][num_misses]``.

    Each is :func:`jaxrl_rm.data.synthetic.corrupt_answer` of the gold (substitute, delete, insert
    or swap one character; never the gold itself, so wrong under exact match), drawn independently
    (two misses of a problem may coincide). On a task where other answers than the gold are right
    (a path problem: `synthetic.rule_label`), an edit that is still right is drawn again (up to 32
    times). ``alphabet``: characters substitutions and insertions draw from (default: those of the
    gold answers). Deterministic in ``seed``.
    """
    from jaxrl_rm.data import synthetic

    golds = [_gold(p) for p in problems]
    prompts = [prompt_as_text(getattr(p, "prompt", "")) for p in problems]
    alphabet = alphabet or "".join(sorted({c for g in golds for c in g})) or "abcdefgh"
    rng = np.random.default_rng([seed, 59])

    def miss(prompt: str, gold: str) -> str:
        for _ in range(32):
            a = synthetic.corrupt_answer(gold, rng, alphabet=alphabet)
            if not synthetic.rule_label(prompt, a, gold):
                break
        return a

    return [[miss(p, g) for _ in range(num_misses)] for p, g in zip(prompts, golds)]


def near_miss_prompts(problems: Sequence[Any], misses: Sequence[Sequence[str]],
                      template: str | JudgeTemplate = "pointwise_correctness", tokenizer=None) -> list[str]:
    """Rendered pointwise judge prompts, per problem its gold answer then its misses:
    ``len(problems) * (1 + k)`` texts (the reference is shown by ``*_ref`` templates)."""
    tpl = _template(template)
    out = []
    for p, row in zip(problems, misses, strict=True):
        gold, q = _gold(p), prompt_as_text(p.prompt)
        extra = {"reference": gold} if tpl.uses_reference else {}
        out += [tpl.render(tokenizer, prompt=q, response=a, **extra) for a in (gold, *row)]
    return out


def near_miss_auc(gold_scores, miss_scores) -> float:
    """Within-problem ranking of gold answers over near misses.

    gold_scores: ``[N]`` float, the judge's score of each problem's gold answer; miss_scores:
    ``[N, k]`` float, its scores of the problem's k near misses. Returns the mean over problems of
    the share of misses the gold answer out-scores, a tie counting 1/2 (AUC of gold vs misses
    within each problem; 1 = every gold above every miss, 0.5 = no within-problem signal, e.g. a
    constant judge). NaN when N or k is 0.
    """
    gold = np.asarray(gold_scores, np.float64)
    miss = np.asarray(miss_scores, np.float64)
    if gold.ndim != 1 or miss.ndim != 2 or miss.shape[0] != gold.shape[0]:
        raise ValueError(f"near_miss_auc: gold_scores [N] and miss_scores [N, k], got {gold.shape} and {miss.shape}")
    if miss.size == 0:
        return float("nan")
    wins = (gold[:, None] > miss) + 0.5 * (gold[:, None] == miss)
    return float(wins.mean(axis=1).mean())


def near_miss_metrics(outputs: Sequence[str], num_misses: int,
                      template: str | JudgeTemplate = "pointwise_correctness") -> dict:
    """Near-miss metrics (module docstring) of judge ``outputs`` laid out as :func:`near_miss_prompts`
    writes them (per problem: gold, then ``num_misses`` misses)."""
    tpl = _template(template)
    width = 1 + int(num_misses)
    if num_misses < 1 or len(outputs) % width:
        raise ValueError(f"near_miss_metrics: {len(outputs)} outputs is not a multiple of 1 + {num_misses}")
    n = len(outputs) // width
    if n == 0:
        return {"auc": float("nan"), "count": 0}
    results = [tpl.parse(o) for o in outputs]
    lo, span = float(tpl.min_score), float(tpl.max_score - tpl.min_score) or 1.0
    # invalid = the template's minimum, as the pointwise judge reward scores it (invalid_reward 0)
    scores = np.asarray([(float(r.value) - lo) / span if r.valid else 0.0 for r in results]).reshape(n, width)
    return {"auc": near_miss_auc(scores[:, 0], scores[:, 1:]), "gold_score": float(scores[:, 0].mean()),
            "miss_score": float(scores[:, 1:].mean()),
            "invalid_rate": float(1 - np.mean([r.valid for r in results])), "count": n}


def evaluate_near_miss(judge: Judge, problems: Sequence[Any], *,
                       template: str | JudgeTemplate = "pointwise_correctness", tokenizer=None, num_misses: int = 4,
                       seed: int = 0, alphabet: str | None = None, batch_size: int = 256) -> dict:
    """Judge each problem's gold answer and ``num_misses`` near misses (:func:`near_miss_answers`)
    and score the verdicts: :func:`near_miss_metrics`. ``problems``: records with ``prompt`` and a
    gold ``answer`` (``VerifiableProblem``) or ``reference`` (``JudgmentExample``)."""
    misses = near_miss_answers(problems, num_misses, seed=seed, alphabet=alphabet)
    texts = near_miss_prompts(problems, misses, template, tokenizer)
    outputs: list[str] = []
    for s in range(0, len(texts), batch_size):
        outputs += list(judge(texts[s:s + batch_size]))
    return near_miss_metrics(outputs, num_misses, template)


# ============================================================================ pairwise


def pairwise_prompts(pairs: Sequence[Any], template: str | JudgeTemplate = "pairwise",
                     tokenizer=None) -> tuple[list[str], list[str]]:
    """Rendered prompts in both orders: (A=chosen, B=rejected) and (A=rejected, B=chosen)."""
    tpl = _template(template)
    ab, ba = [], []
    for p in pairs:
        q = prompt_as_text(p.prompt)
        ab.append(tpl.render(tokenizer, prompt=q, response_a=p.chosen, response_b=p.rejected))
        ba.append(tpl.render(tokenizer, prompt=q, response_a=p.rejected, response_b=p.chosen))
    return ab, ba


def pairwise_metrics(outputs_ab: Sequence[str], outputs_ba: Sequence[str],
                     template: str | JudgeTemplate = "pairwise", *, subsets: Sequence[str | None] | None = None) -> dict:
    """Metrics of pairwise judgments in both orders (see module docstring). ``outputs_ab[i]`` judged
    (A=chosen, B=rejected) of pair i, ``outputs_ba[i]`` the swapped order."""
    tpl = _template(template)
    if len(outputs_ab) != len(outputs_ba):
        raise ValueError(f"pairwise_metrics: {len(outputs_ab)} A/B outputs but {len(outputs_ba)} B/A outputs")
    n = len(outputs_ab)
    if n == 0:
        return {"accuracy": float("nan"), "count": 0}
    o1 = [pairwise_outcome(tpl.parse(t)) for t in outputs_ab]  # 1: A (= chosen) wins
    o2 = [pairwise_outcome(tpl.parse(t)) for t in outputs_ba]  # 0: B (= chosen) wins
    right1 = np.asarray([o == 1.0 for o in o1])
    right2 = np.asarray([o == 0.0 for o in o2])
    decided = [(a, b) for a, b in zip(o1, o2) if a in (0.0, 1.0) and b in (0.0, 1.0)]
    consistent = [(a == 1.0) == (b == 0.0) for a, b in decided]
    verdicts = [o for o in o1 + o2 if o in (0.0, 1.0)]
    both = o1 + o2
    out = {
        "accuracy": float(np.concatenate([right1, right2]).mean()),
        "consistent_accuracy": float((right1 & right2).mean()),
        "position_consistency": float(np.mean(consistent)) if consistent else float("nan"),
        "position_bias_rate": float(1 - np.mean(consistent)) if consistent else float("nan"),
        "a_rate": float(np.mean([v == 1.0 for v in verdicts])) if verdicts else float("nan"),
        "invalid_rate": float(np.mean([o is None for o in both])),
        "tie_rate": float(np.mean([o == 0.5 for o in both])),
        "count": n,
    }
    if subsets is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(subsets):
            if s is not None:
                groups[s].append(i)
        for s, idx in sorted(groups.items()):
            out[f"accuracy/{s}"] = float(np.concatenate([right1[idx], right2[idx]]).mean())
            out[f"count/{s}"] = len(idx)
    return out


def evaluate_pairwise(judge: Judge, pairs: Sequence[Any], *, template: str | JudgeTemplate = "pairwise",
                      tokenizer=None, batch_size: int = 256) -> dict:
    """Judge every pair in both orders and score it: :func:`pairwise_metrics`."""
    ab, ba = pairwise_prompts(pairs, template, tokenizer)
    texts = ab + ba
    outputs: list[str] = []
    for s in range(0, len(texts), batch_size):
        outputs += list(judge(texts[s:s + batch_size]))
    return pairwise_metrics(outputs[:len(ab)], outputs[len(ab):], template,
                            subsets=[getattr(p, "subset", None) for p in pairs])


# ============================================================================ data


def gsm8k_pairs(examples: Sequence[Any], *, max_pairs_per_question: int | None = None) -> list:
    """Correct-vs-incorrect ``PreferencePair``s from GSM8K model solutions (``load_gsm8k_solutions``).

    Examples are grouped by question (in order); every (correct, incorrect) combination becomes a
    pair with ``subset = "<chosen policy>><rejected policy>"`` (policies from the example ids),
    at most ``max_pairs_per_question`` per question. Questions whose solutions are all correct or
    all incorrect give none. Pairs with identical texts are dropped.
    """
    from jaxrl_rm.data.records import PreferencePair

    groups: dict[Any, list] = {}
    for ex in examples:
        groups.setdefault(prompt_as_text(ex.prompt), []).append(ex)
    out = []
    for q, exs in groups.items():
        good = [e for e in exs if bool(e.label)]
        bad = [e for e in exs if not bool(e.label)]
        made = 0
        for g, b in itertools.product(good, bad):
            if max_pairs_per_question is not None and made >= max_pairs_per_question:
                break
            if g.response == b.response:
                continue
            pol = lambda e: str(e.id).rsplit(":", 1)[-1] if e.id is not None else "?"
            out.append(PreferencePair(prompt=g.prompt, chosen=g.response, rejected=b.response,
                                      subset=f"{pol(g)}>{pol(b)}", id=f"{g.id}>{b.id}"))
            made += 1
    return out


def alpaca_eval_pairs(outputs_path, annotations_path, *, min_margin: float = 0.0, on_bad_row: str = "error") -> list:
    """AlpacaEval judge annotations -> ``PreferencePair``s (generator answer vs baseline answer).

    An annotation with preference p in [1, 2] (p > 1.5: the generator won) gives chosen = the
    winner's output, rejected = the other's, ``subset`` = the generator. Ties (p = 1.5) and
    ``|p − 1.5| < min_margin`` are skipped, and so are annotations whose outputs are missing or identical.
    """
    from jaxrl_rm.data.loaders import load_alpaca_eval_annotations, load_alpaca_eval_outputs
    from jaxrl_rm.data.records import PreferencePair

    outputs, _ = load_alpaca_eval_outputs(outputs_path, on_bad_row=on_bad_row)
    annotations, _ = load_alpaca_eval_annotations(annotations_path, on_bad_row=on_bad_row)
    out = []
    for a in annotations:
        item = outputs.get(a.id)
        if item is None or a.generator not in item.outputs or a.baseline not in item.outputs:
            continue
        if a.preference == 1.5 or abs(a.preference - 1.5) < min_margin:
            continue
        gen, base = item.outputs[a.generator], item.outputs[a.baseline]
        if gen == base:
            continue
        chosen, rejected = (gen, base) if a.preference > 1.5 else (base, gen)
        out.append(PreferencePair(prompt=item.instruction, chosen=chosen, rejected=rejected, subset=a.generator,
                                  id=f"{a.id}:{a.generator}:{a.baseline}"))
    return out


__all__ = ["alpaca_eval_pairs", "evaluate_near_miss", "evaluate_pairwise", "evaluate_pointwise", "gsm8k_pairs",
           "near_miss_answers", "near_miss_auc", "near_miss_metrics", "near_miss_prompts", "pairwise_metrics",
           "pairwise_prompts", "pointwise_metrics", "pointwise_prompts"]
