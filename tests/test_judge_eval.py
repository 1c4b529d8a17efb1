"""Judge evaluation on real labelled data (GSM8K model solutions, AlpacaEval annotations) with
scripted judges, and the metric definitions on small hand-made sets."""

import re

import numpy as np
import pytest

from jaxrl_rm.data.records import JudgmentExample, PreferencePair
from jaxrl_rm.eval.judge import (alpaca_eval_pairs, evaluate_pairwise, evaluate_pointwise, gsm8k_pairs,
                                 pairwise_metrics, pointwise_metrics)
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
