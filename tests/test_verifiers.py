"""Rule verifiers: answer extraction, math-verify agreement on GSM8K, guards, timeouts and threads."""

from __future__ import annotations

import ast
import gzip
import json
import threading
import time

import numpy as np
import pytest

from jaxrl_rm.rewards import (
    ExactMatchVerifier,
    GuardCounter,
    MathVerifier,
    exact_match,
    extract_answer,
    gsm8k_answer,
    normalize_answer,
    verify_math,
)
from jaxrl_rm.rewards.verifiers import ProcessPool
from test_guards import EMPTY_OUTPUTS, MASTER_KEYS

POLICIES = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text,answer",
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### 1,450,000", "1450000"),
        ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("$\\boxed{1{,}000}$", "1000"),
        ("The answer is 18.", "18"),
        ("So the final answer is: $18 per day. Then we stop.", "$18 per day"),
        ("The answer is 3.5. Done", "3.5"),
        ("work\nA: 26", "26"),
        ("work\n**Final Answer:** 42", "42"),
        ("Answer: 7\nwait, no.\n#### 8", "8"),  # last marker wins
        ("#### 8\nActually the answer is 9.", "9"),
        ("#### 7 \\boxed{5}", "5"),
    ],
)
def test_extract_answer(text, answer):
    r = extract_answer(text)
    assert r.valid and r.value == answer


@pytest.mark.parametrize("text", ["I think it's 18", "Plan A: buy eggs", "####", "\\boxed{", "A:   \n", None, "", 5])
def test_extract_answer_none(text):
    r = extract_answer(text)
    assert not r.valid and r.value is None


def test_gsm8k_answer_and_normalize():
    assert gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_answer("no marker") is None
    assert normalize_answer("  **Paris.** ") == "paris"
    assert normalize_answer("$\\text{1,000}$") == "1000"


# ----------------------------------------------------------------------------- math verifier


def test_math_verifier_basic():
    v = MathVerifier(backend="inline")
    out = v(
        [
            "9 * 2 = 18\n#### 18",
            "#### 18.0",
            "The answer is $\\frac{36}{2}$.",
            "\\boxed{0.5}",
            "#### 17",
            "It is 18.",  # no answer marker: no reward by default
            "A: 2,125",
            "A: $18 per day",
        ],
        ["18", "#### 18", "18", "\\frac{1}{2}", "18", "18", "2125", "18"],
    )
    assert out.rewards.dtype == np.float32 and out.rewards.shape == (8,)
    assert out.rewards.tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    assert [r.reason for r in out.results] == ["correct"] * 4 + ["incorrect", "no_answer", "correct", "correct"]
    assert out.results[0].answer == "18" and out.results[0].gold == ("18",)
    lenient = MathVerifier(backend="inline", fallback="math_verify")
    assert lenient(["It is 18."], ["18"]).rewards.tolist() == [1.0]
    assert MathVerifier(backend="inline", correct_reward=2.0, incorrect_reward=-1.0)(
        ["#### 1", "#### 2", ":"], ["1", "1", "1"]
    ).rewards.tolist() == [2.0, -1.0, 0.0]
    assert v(["#### 5"], [None]).results[0].reason == "no_gold"
    assert v(["#### 5"], [["4", "5"]]).rewards.tolist() == [1.0]  # any of several golds
    with pytest.raises(ValueError):
        v(["a"], ["1", "2"])
    with pytest.raises(ValueError):
        MathVerifier(backend="threads")


def test_master_keys_get_no_verifier_reward():
    texts = MASTER_KEYS + EMPTY_OUTPUTS + ["18 18 18 18", "#### 18 #### 18 #### 18 #### 18", "!!!!!!!!!!!!!!!!!!!!"]
    counter = GuardCounter()
    for v in (
        MathVerifier(backend="inline", counter=counter),
        MathVerifier(backend="inline", fallback="math_verify", counter=counter),
        ExactMatchVerifier(counter=counter),
        ExactMatchVerifier(fallback="none", counter=counter),
    ):
        # golds chosen so that a lenient comparison would otherwise match
        golds = [t if t.strip() else "0" for t in texts[:-3]] + ["18", "18", "!"]
        out = v(texts, golds)
        assert out.rewards.tolist() == [0.0] * len(texts), [r.reason for r in out.results]
        assert all(not r.valid for r in out.results)
    rep = counter.report()
    assert rep["master_key"] > 0 and rep["empty"] > 0 and rep["repetition"] > 0


def test_prompt_echo_gets_no_reward():
    prompt = "Example: 'The answer is 18.' Now you: what is 16 - 3 - 4, times 2?"
    v = MathVerifier(backend="inline")
    out = v([prompt, "9 * 2 = 18. The answer is 18."], ["18", "18"], prompts=[prompt, prompt])
    assert out.rewards.tolist() == [0.0, 1.0]
    assert out.results[0].reason == "prompt_echo" and v.guard_report()["prompt_echo"] == 1
    # without the guard the echoed example answer would have been rewarded
    from jaxrl_rm.rewards import GuardConfig

    unguarded = MathVerifier(backend="inline", guards=GuardConfig(prompt_echo=False))
    assert unguarded([prompt], ["18"], prompts=[prompt]).rewards.tolist() == [1.0]


def test_exact_match_verifier():
    out = exact_match(["Paris.", "The answer is paris", "#### Lyon", "", "It is Paris"], ["Paris"] * 5)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r.reason for r in out.results] == ["correct", "correct", "incorrect", "empty", "incorrect"]
    strict = ExactMatchVerifier(fallback="none")
    assert strict(["Paris"], ["Paris"]).results[0].reason == "no_answer"
    raw = ExactMatchVerifier(normalize=None)
    assert raw(["paris", " Paris "], ["Paris", "Paris"]).rewards.tolist() == [0.0, 1.0]
    assert exact_match(["#### 1,000"], ["1000"]).rewards.tolist() == [1.0]
    assert exact_match(["A: blue"], [["red", "Blue"]]).rewards.tolist() == [1.0]


# ----------------------------------------------------------------------------- MATH-style answers

# Final answers as they appear in MATH solutions' \boxed{} (all subjects: radicals, powers,
# fractions, intervals, tuples, sets, pi, polynomials, units, percent, dollars, text, matrices).
MATH_GOLDS = [
    r"3\sqrt{3}", r"2^{10}", r"\frac{1}{2}", r"\dfrac{5}{9}", r"\frac34", r"-\frac{2}{3}", r"\sqrt{2}",
    r"\frac{\sqrt{3}}{2}", r"2\sqrt{5}", r"(1, 2)", r"(3,-1)", r"[1, 2)", r"(-\infty, 3]",
    r"(-\infty,-2)\cup(3,\infty)", r"-2, 1", r"\{1, 2, 3\}", r"\pi", r"\frac{\pi}{2}", r"4\pi", r"6 - 2\pi",
    r"x^2+2x+1", r"2x^2 - 5x + 3", r"-7", r"0", r"1.25", r"1000", r"20\%", r"90^\circ", r"10\text{ inches}",
    r"\text{(C)}", r"\text{Monday}", r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", r"y = -2x + 3", r"x = 5",
    r"\$18.90", r"1,\!000", r"\left( 3, \frac{\pi}{2} \right)", r"\sqrt[3]{2}", r"\frac{1+\sqrt{5}}{2}",
    r"\infty", r"\frac{1}{\sqrt{2}}", r"10!", r"\log_2 3", r"\tfrac{3}{8}", r"\text{even}",
    r"\sqrt{6} - \sqrt{2}", r"\frac{-1 + \sqrt{13}}{2}", r"4x(x+2)", r"\$42", r"12{,}500",
]

# The forms models emit: boxed (bare, in $…$, mid-text), "The answer is …", "#### …", "Final Answer: …".
RESPONSE_FORMS = [
    lambda a: f"\\boxed{{{a}}}",
    lambda a: f"The answer is ${a}$.",
    lambda a: f"Adding them up gives\n#### {a}",
    lambda a: f"Final Answer: {a}",
    lambda a: f"So the answer is $\\boxed{{{a}}}$.",
    lambda a: f"The answer is {a}.",
]

# (gold, an equivalent form of it)
MATH_EQUIVALENT = [
    (r"3\sqrt{3}", r"\sqrt{27}"), (r"3\sqrt{3}", r"3\sqrt3"), (r"2^{10}", "1024"), (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", r"\dfrac{1}{2}"), (r"\frac34", r"\frac{3}{4}"), (r"\frac34", "0.75"),
    (r"\dfrac{5}{9}", r"\frac{10}{18}"), (r"-\frac{2}{3}", r"\frac{-2}{3}"), (r"-\frac{2}{3}", "-2/3"),
    (r"\sqrt{2}", r"2^{1/2}"), (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"), (r"2\sqrt{5}", r"\sqrt{20}"),
    ("(1, 2)", "(1,2)"), ("(3,-1)", r"\left(3, -1\right)"), ("[1, 2)", "[1,2)"), (r"(-\infty, 3]", r"(-\infty,3]"),
    ("-2, 1", "1, -2"), (r"\{1,2,3\}", r"\{3, 2, 1\}"), (r"\frac{\pi}{2}", r"\pi/2"), (r"4\pi", r"4 \pi"),
    (r"6 - 2\pi", r"-2\pi + 6"), ("x^2+2x+1", "(x+1)^2"), ("2x^2 - 5x + 3", "(2x-3)(x-1)"), ("4x(x+2)", "4x^2+8x"),
    ("-7", "-7.0"), ("-4", r"-\frac{8}{2}"), ("1.25", r"\frac{5}{4}"), (r"\frac{9}{4}", "2.25"), ("1000", "1,000"),
    ("1000", "1{,}000"), (r"12{,}500", "12500"), (r"1,\!000", "1000"), (r"20\%", "20"), (r"20\%", "0.2"),
    (r"90^\circ", "90"), (r"10\text{ inches}", "10"), (r"10 \text{ cm}", "10"), (r"\text{(C)}", "C"),
    (r"\text{(C)}", "(C)"), ("x = 5", "5"), ("5", "x = 5"), ("y = -2x + 3", "y = 3 - 2x"), (r"\$18.90", "18.9"),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{1}{2} + \frac{\sqrt{5}}{2}"), (r"\sqrt[3]{2}", r"2^{1/3}"),
    (r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", r"\begin{pmatrix}1\\-2\end{pmatrix}"),
    (r"\sqrt{6} - \sqrt{2}", r"-\sqrt{2} + \sqrt{6}"),
    (r"0.\overline{3}", r"\frac13"),  # math-verify does not read repeating decimals: the known miss
]

# (gold, a wrong answer sharing a prefix with it): what a prefix-only parse would accept
MATH_WRONG = [
    (r"3\sqrt{3}", "3"), (r"2^{10}", "2"), (r"2^{10}", "2^{11}"), (r"\frac{1}{2}", "1"), (r"\sqrt{2}", "2"),
    ("(1, 2)", "(1, 3)"), ("(1, 2)", "2"), ("(1, 2)", "1"), ("[1, 2)", "[1, 2]"), ("[1, 2)", "(1, 2)"),
    (r"-\frac{2}{3}", "-2"), (r"2\sqrt{5}", "2"), (r"\frac{\pi}{2}", r"\pi"), (r"4\pi", "4"), ("x^2+2x+1", "x^2+2x"),
    ("x^2+2x+1", "x^2"), ("1.25", "1.2"), ("1000", "100"), ("-7", "7"), (r"20\%", "2"),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{1}{2}"), (r"6 - 2\pi", "6"), (r"(-\infty, 3]", r"(-\infty, 3)"), ("10!", "10"),
    (r"\sqrt{6} - \sqrt{2}", r"\sqrt{6}"), ("2x^2 - 5x + 3", "2x^2 - 5x"), ("-2, 1", "-2"),
    (r"\frac{-1 + \sqrt{13}}{2}", "-1"), (r"12{,}500", "12"), (r"\frac34", "3"), (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}"),
    ("x = 5", "x = 6"), (r"\log_2 3", r"\log_2 4"),
]


def test_math_gold_answers_verify_against_themselves():
    assert len(MATH_GOLDS) >= 30
    v = MathVerifier(backend="inline")
    for g in MATH_GOLDS:
        solution = f"Combining the cases, the answer is $\\boxed{{{g}}}$."
        responses = [form(g) for form in RESPONSE_FORMS] + [solution]
        golds = [g] * len(RESPONSE_FORMS) + [solution]  # bare gold; full worked solution vs itself
        out = v(responses, golds)
        assert [r.reason for r in out.results] == ["correct"] * len(responses), (g, [r.answer for r in out.results])


def test_math_equivalent_and_prefix_sharing_wrong_answers():
    """≥ 98 % right on (gold, equivalent) and (gold, prefix-sharing wrong) pairs in every response
    form (measured: all but the repeating decimal)."""
    rows = [(g, form(a), True) for g, a in MATH_EQUIVALENT for form in RESPONSE_FORMS]
    rows += [(g, form(a), False) for g, a in MATH_WRONG for form in RESPONSE_FORMS]
    assert len(MATH_EQUIVALENT) + len(MATH_WRONG) >= 60
    out = MathVerifier(backend="inline")([r[1] for r in rows], [r[0] for r in rows])
    assert all(r.valid for r in out.results)
    misses = [(g, resp, want) for (g, resp, want), r in zip(rows, out.results) if r.value != want]
    assert 1 - len(misses) / len(rows) >= 0.98, misses
    # every prefix-sharing wrong answer is wrong in every form: a partial parse never scores
    assert [m for m in misses if not m[2]] == []


def test_math_prefix_of_gold_is_not_correct():
    """The issue's cases: a LaTeX gold read as its prefix made wrong answers right and right ones wrong."""
    v = MathVerifier(backend="inline")
    gold = "$\\boxed{3\\sqrt{3}}$"
    out = v(["\\boxed{3\\sqrt{3}}", "\\boxed{3}", "The answer is 3.", "The answer is $3\\sqrt{3}$."], [gold] * 4)
    assert [r.reason for r in out.results] == ["correct", "incorrect", "incorrect", "correct"]
    out = v(["#### 1024", "#### 2", "\\boxed{2^{10}}"], ["2^{10}"] * 3)
    assert out.rewards.tolist() == [1.0, 0.0, 1.0]
    out = v(["\\boxed{(1, 2)}", "\\boxed{2}"], ["(1, 2)"] * 2)
    assert out.rewards.tolist() == [1.0, 0.0]
    # the gold used to parse to nothing
    out = v(["The answer is $\\sqrt{2}$.", "\\boxed{\\sqrt{2}}", "#### 2"], ["\\sqrt{2}"] * 3)
    assert [r.reason for r in out.results] == ["correct", "correct", "incorrect"]


def test_math_bare_and_prose_answers():
    # bare final answers (no marker): the lenient fallback reads a one-line answer as LaTeX
    lenient = MathVerifier(backend="inline", fallback="math_verify")
    out = lenient(["3\\sqrt{3}", "3", "\\frac{1}{2}", "It is 18."], ["3\\sqrt{3}", "3\\sqrt{3}", "0.5", "18"])
    assert out.rewards.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert MathVerifier(backend="inline")(["3\\sqrt{3}"], ["3\\sqrt{3}"]).results[0].reason == "no_answer"
    # prose around a number is read as the number, not as a product of letters
    v = MathVerifier(backend="inline")
    out = v(["A: 18 eggs", "The answer is $18 per day.", "\\boxed{18 \\text{ eggs}}", "Final Answer: 3/4 of a cup",
             "#### $18.50", "The answer is (C)."], ["18", "18", "18", "\\frac{3}{4}", "\\$18.50", "\\text{(C)}"])
    assert out.rewards.tolist() == [1.0] * 6


# ----------------------------------------------------------------------------- real data


def _load_solutions(shared_data, limit=None):
    rows = []
    with gzip.open(shared_data / "gsm8k" / "example_model_solutions.jsonl.gz", "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    responses, golds, prompts, labels = [], [], [], []
    for row in rows:
        for key in POLICIES:
            field = row[key]
            if isinstance(field, str):  # the Python repr of a dict: parse it, never eval
                field = ast.literal_eval(field)
            responses.append(field["solution"])
            labels.append(bool(field["is_correct"]))
            golds.append(row["ground_truth"])  # worked solution ending in "A: <n>"
            prompts.append(row["question"])
    return responses, golds, prompts, np.asarray(labels)


def test_agreement_with_gsm8k_labels(shared_data):
    """≥ 99% agreement with the is_correct labels of 4 × 1319 model solutions (measured: 100%)."""
    responses, golds, prompts, labels = _load_solutions(shared_data)
    assert len(responses) == 4 * 1319
    v = MathVerifier(backend="inline")
    t0 = time.perf_counter()
    out = v(responses, golds, prompts)
    elapsed = time.perf_counter() - t0
    agreement = float(np.mean((out.rewards > 0) == labels))
    print(f"GSM8K example solutions: agreement {agreement:.4%} on {len(labels)} in {elapsed:.1f}s")
    assert agreement >= 0.99
    # no correct solution is lost to a guard
    guarded = [r.reason for r, lab in zip(out.results, labels) if lab and not r.valid]
    assert guarded == []


def test_gold_answers_verify_against_themselves(shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    answers = [row["answer"] for row in rows]
    finals = [gsm8k_answer(a) for a in answers]
    assert len(rows) == 1319 and all(finals)
    v = MathVerifier(backend="inline")
    out = v(answers, answers, [row["question"] for row in rows])  # full worked solution vs itself
    assert out.rewards.tolist() == [1.0] * len(rows)
    out2 = v(["#### " + a for a in finals], finals)  # bare final answers
    assert out2.rewards.tolist() == [1.0] * len(rows)
    assert exact_match(answers, finals).rewards.tolist() == [1.0] * len(rows)


def test_process_backend_agrees_with_inline(shared_data):
    responses, golds, prompts, labels = _load_solutions(shared_data, limit=60)
    with MathVerifier(backend="process", workers=2) as v:
        out = v(responses, golds, prompts)
    inline = MathVerifier(backend="inline")(responses, golds, prompts)
    assert out.rewards.tolist() == inline.rewards.tolist()
    assert [r.reason for r in out.results] == [r.reason for r in inline.results]
    assert float(np.mean((out.rewards > 0) == labels)) >= 0.99


# ----------------------------------------------------------------------------- threads and timeouts


def test_off_main_thread():
    """math-verify's signal timeouts raise off the main thread; our backends must not."""
    responses, golds = ["#### 18", "\\boxed{\\frac{1}{2}}", "#### 3"], ["18", "0.5", "4"]
    got: dict = {}

    def work():
        try:
            with MathVerifier() as auto:  # auto → process backend off the main thread
                got["backend"] = auto.resolve_backend()
                got["auto"] = auto(responses, golds).rewards.tolist()
            got["inline"] = MathVerifier(backend="inline")(responses, golds).rewards.tolist()
        except BaseException as e:  # noqa: BLE001
            got["error"] = repr(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)
    assert "error" not in got, got.get("error")
    assert got["backend"] == "process"
    assert got["auto"] == got["inline"] == [1.0, 1.0, 0.0]
    assert MathVerifier().resolve_backend() == "inline"  # on the main thread
    assert verify_math(responses, golds).rewards.tolist() == [1.0, 1.0, 0.0]


def test_process_pool_hard_timeout():
    """A stuck item is killed after its deadline; the pool replaces the worker and goes on."""
    pool = ProcessPool(time.sleep, workers=1)
    try:
        t0 = time.perf_counter()
        out = pool.run([(0.0,), (60.0,), (0.0,)], deadline_s=1.0)
        assert time.perf_counter() - t0 < 30
        assert [s for s, _ in out] == ["ok", "timeout", "ok"]
        assert pool.restarts == 1
        assert pool.run([("not a number",)], deadline_s=5.0)[0][0] == "error"  # exceptions are reported
    finally:
        pool.close()
