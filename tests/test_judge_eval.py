"""Judge evaluation on real labelled data (GSM8K model solutions, AlpacaEval annotations) with
scripted judges, and the metric definitions on small hand-made sets."""

import re

import numpy as np
import pytest

from jaxrl_rm.data.records import JudgmentExample, PreferencePair
from jaxrl_rm.eval.judge import (alpaca_eval_pairs, evaluate_near_miss, evaluate_pairwise, evaluate_pointwise,
                                 gsm8k_pairs, near_miss_answers, near_miss_auc, near_miss_metrics, pairwise_metrics,
                                 pointwise_metrics)
from jaxrl_rm.rewards.verifiers import ExactMatchVerifier

_Q = re.compile(r"\[User Question\]\n(.*?)\n\n\[", re.S)
_REF = re.compile(r"\[Reference Answer\]\n(.*?)\n\[End of Reference Answer\]", re.S)
_RESP = re.compile(r"\[The Start of the Assistant's Answer\]\n(.*?)\n\[The End of the Assistant's Answer\]", re.S)
_PAIR = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


def score(s) -> str:
    return f"<think>I compared the final answer with the expected one.</think><score>{s}</score>"


def verdict(v) -> str:
    return f"<think>Checked both final answers.</think><answer>[[{v}]]</answer>"


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    from jaxrl_rm.data.loaders import load_gsm8k_solutions

    examples, stats = load_gsm8k_solutions(shared_data / "gsm8k" / "example_model_solutions.jsonl.gz")
    assert stats.rows_skipped == 0 and len(examples) == 4 * 1319
    return examples


def verifier_judge_pointwise(texts):
    """A reference-guided scripted judge: reads reference and response out of the prompt and
    outputs the J1 format with the exact-match verdict."""
    refs = [_REF.search(t).group(1) for t in texts]
    resps = [_RESP.search(t).group(1) for t in texts]
    ok = ExactMatchVerifier()(resps, refs).rewards > 0
    return [score(int(o)) for o in ok]


def test_pointwise_accuracy_on_gsm8k_solutions(gsm8k):
    labels = np.asarray([e.label for e in gsm8k])
    by_key = {(e.prompt, e.response): e.label for e in gsm8k}

    def oracle(texts):
        return [score(int(by_key[(_Q.search(t).group(1), _RESP.search(t).group(1))])) for t in texts]

    m = evaluate_pointwise(oracle, gsm8k, template="pointwise_correctness")
    assert m["accuracy"] == 1.0 and m["invalid_rate"] == 0.0 and m["balanced_accuracy"] == 1.0
    assert m["count"] == len(gsm8k) and m["count/label_1"] == labels.sum()

    m = evaluate_pointwise(verifier_judge_pointwise, gsm8k, template="pointwise_correctness_ref")
    assert m["accuracy"] >= 0.99 and m["invalid_rate"] == 0.0

    m = evaluate_pointwise(lambda ts: [score(1)] * len(ts), gsm8k)  # "everything is correct"
    assert m["accuracy"] == pytest.approx(labels.mean())
    assert m["accuracy/label_1"] == 1.0 and m["accuracy/label_0"] == 0.0 and m["balanced_accuracy"] == 0.5

    m = evaluate_pointwise(lambda ts: [":"] * len(ts), gsm8k[:40])  # master key: invalid, never right
    assert m["accuracy"] == 0.0 and m["invalid_rate"] == 1.0 and "mean_prediction" not in m


def test_pairwise_accuracy_and_position_consistency_on_gsm8k(gsm8k):
    pairs = gsm8k_pairs(gsm8k)
    assert pairs and all(p.chosen != p.rejected for p in pairs)
    correct = {(e.prompt, e.response) for e in gsm8k if e.label}
    assert all((p.prompt, p.chosen) in correct and (p.prompt, p.rejected) not in correct for p in pairs)
    golds = {e.prompt: e.reference for e in gsm8k}

    def verifier_judge(texts):
        out = []
        for t in texts:
            blocks = dict(_PAIR.findall(t))
            ok = ExactMatchVerifier()([blocks["A"], blocks["B"]], [golds[_Q.search(t).group(1)]] * 2).rewards > 0
            out.append(verdict("A" if ok[0] and not ok[1] else "B" if ok[1] and not ok[0] else "A"))
        return out

    m = evaluate_pairwise(verifier_judge, pairs)
    assert m["count"] == len(pairs)
    assert m["accuracy"] >= 0.99 and m["position_consistency"] >= 0.99 and m["invalid_rate"] == 0.0
    assert any(k.startswith("accuracy/175b_verification>") for k in m)

    m = evaluate_pairwise(lambda ts: [verdict("A")] * len(ts), pairs)  # pure position bias
    assert m["accuracy"] == 0.5 and m["consistent_accuracy"] == 0.0
    assert m["position_consistency"] == 0.0 and m["position_bias_rate"] == 1.0 and m["a_rate"] == 1.0


def test_pairwise_on_alpaca_eval_annotations(shared_data):
    from jaxrl_rm.data.loaders import load_alpaca_eval_annotations

    d = shared_data / "alpaca_eval"
    pairs = alpaca_eval_pairs(d / "outputs.jsonl.gz", d / "annotations.jsonl.gz")
    anns, _ = load_alpaca_eval_annotations(d / "annotations.jsonl.gz")
    assert 0 < len(pairs) <= sum(a.preference != 1.5 for a in anns)
    chosen = {(p.prompt, p.chosen, p.rejected) for p in pairs}

    def oracle(texts):
        out = []
        for t in texts:
            b = dict(_PAIR.findall(t))
            q = t[t.index("[User Question]\n") + 16: t.index("\n\n[The Start of Assistant A's Answer]")]
            out.append(verdict("A" if (q, b["A"], b["B"]) in chosen else "B"))
        return out

    sub = pairs[:: max(len(pairs) // 400, 1)]
    m = evaluate_pairwise(oracle, sub)
    assert m["accuracy"] == 1.0 and m["position_consistency"] == 1.0

    def longer(texts):  # an order-independent heuristic judge
        return [verdict("A" if len(b["A"]) >= len(b["B"]) else "B") for b in (dict(_PAIR.findall(t)) for t in texts)]

    m = evaluate_pairwise(longer, sub)
    expect = np.mean([len(p.chosen) > len(p.rejected) for p in sub])
    assert m["accuracy"] == pytest.approx(expect, abs=1e-9) and m["position_consistency"] == 1.0
    assert set(k for k in m if k.startswith("accuracy/")) <= {f"accuracy/{p.subset}" for p in sub}


def test_metric_definitions_on_handmade_sets():
    exs = [JudgmentExample(prompt="q", response=f"r{i}", label=lab) for i, lab in enumerate([True, True, False, False])]
    m = pointwise_metrics(exs, [score(1), "junk", score(1), score(0)])
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.25 and m["accuracy_valid"] == pytest.approx(2 / 3)
    assert m["accuracy/label_1"] == 0.5 and m["accuracy/label_0"] == 0.5
    # numeric labels with a tolerance (0-10 template)
    exs = [JudgmentExample(prompt="q", response="r", label=7.0)] * 2
    assert pointwise_metrics(exs, [score(8), score(5)], "pointwise", tolerance=1.0)["accuracy"] == 0.5

    # pairwise: pair 0 right both ways; pair 1 flips with the order; pair 2 invalid once
    ab = [verdict("A"), verdict("A"), "garbage"]
    ba = [verdict("B"), verdict("A"), verdict("B")]
    m = pairwise_metrics(ab, ba, subsets=["x", "y", "x"])
    assert m["accuracy"] == pytest.approx(4 / 6) and m["consistent_accuracy"] == pytest.approx(1 / 3)
    assert m["position_consistency"] == 0.5 and m["position_bias_rate"] == 0.5
    assert m["invalid_rate"] == pytest.approx(1 / 6) and m["accuracy/x"] == 0.75 and m["accuracy/y"] == 0.5
    pairs = [PreferencePair(prompt="q", chosen="good", rejected="bad")]
    m = evaluate_pairwise(lambda ts: ["<think>tie</think><score_A>5</score_A><score_B>5</score_B>"] * len(ts),
                          pairs, template="pairwise_scores")
    assert m["tie_rate"] == 1.0 and m["accuracy"] == 0.0


def test_near_miss_auc_by_hand():
    """Gold-vs-near-miss AUC: per problem the share of misses the gold out-scores (ties 1/2), then
    the mean over problems; an unparseable verdict scores the template's minimum."""
    assert near_miss_auc([1, 0], [[0, 1], [0, 0]]) == pytest.approx((0.75 + 0.5) / 2)
    assert near_miss_auc([5, 5], [[5, 5, 5], [5, 5, 5]]) == 0.5  # a constant judge: no signal
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        near_miss_auc([1, 0], [0, 1])
    # 0-10 template, k = 3, per problem: gold then its misses
    outputs = [score(9), score(3), score(9), "junk",  # 1 + 1/2 (tie) + 1 (junk = 0) -> 2.5 / 3
               "junk", score(0), score(5), "junk",  # junk = 0: tie, loss, tie -> 1 / 3
               score(4), score(6), score(2), score(4)]  # 0 + 1 + 1/2 -> 1.5 / 3
    m = near_miss_metrics(outputs, 3, "pointwise")
    assert m["auc"] == pytest.approx(5 / 9) and m["count"] == 3 and m["invalid_rate"] == pytest.approx(3 / 12)
    assert m["gold_score"] == pytest.approx(1.3 / 3) and m["miss_score"] == pytest.approx(2.9 / 9)
    with pytest.raises(ValueError, match="multiple"):
        near_miss_metrics(outputs[:-1], 3, "pointwise")


def test_near_miss_evaluation_with_scripted_judges():
    from jaxrl_rm.data import synthetic

    probs = synthetic.reverse_problems(40, seed=0, split="eval")
    misses = near_miss_answers(probs, 4, seed=3)
    assert misses == near_miss_answers(probs, 4, seed=3) and misses != near_miss_answers(probs, 4, seed=4)
    for p, row in zip(probs, misses):  # one edit: never the gold, length within 1, gold's characters
        assert len(row) == 4 and all(a != p.answer and abs(len(a) - len(p.answer)) <= 1 for a in row)
        assert set("".join(row)) <= set("abcdefgh")
    kw = dict(template="pointwise_correctness_ref", num_misses=4, seed=3)
    m = evaluate_near_miss(verifier_judge_pointwise, probs, **kw)  # compares with the reference
    assert m["auc"] == 1.0 and m["gold_score"] == 1.0 and m["miss_score"] == 0.0 and m["count"] == 40
    m = evaluate_near_miss(lambda ts: [score(1)] * len(ts), probs, **kw)  # "everything is correct"
    assert m["auc"] == 0.5 and m["miss_score"] == 1.0

    def by_length(texts):  # a shortcut judge: accepts answers of the problem word's length
        return [score(int(len(_RESP.search(t).group(1)) == len(_REF.search(t).group(1)))) for t in texts]

    m = evaluate_near_miss(by_length, probs, **kw)  # beats chance on deletions / insertions only
    assert 0.55 < m["auc"] < 0.85
    exs = [JudgmentExample(prompt=p.prompt, response="x", label=False, reference=p.answer) for p in probs]
    assert evaluate_near_miss(verifier_judge_pointwise, exs, **kw) == evaluate_near_miss(verifier_judge_pointwise,
                                                                                           probs, **kw)


def test_j1_near_miss_set_takes_distinct_held_out_problems():
    from jaxrl_rm.config import load_config
    from jaxrl_rm.train.judge import near_miss_set

    exs = [JudgmentExample(prompt=f"reverse:{w}=", response=r, label=r == w[::-1], reference=w[::-1])
           for w, r in [("abc", "cba"), ("abc", "cbb"), ("dde", "edd"), ("fgh", "hg"), ("hha", "ahh")]]
    cfg = load_config(None, ["task=judge_j1", "judge.near_miss_prompts=3", "judge.near_misses_per_prompt=2"])
    problems, misses = near_miss_set(cfg, exs)
    assert [p.reference for p in problems] == ["cba", "edd", "hgf"] and [len(r) for r in misses] == [2, 2, 2]
    assert near_miss_set(load_config(None, ["task=judge_j1", "judge.near_miss_prompts=0"]), exs) == ([], [])
