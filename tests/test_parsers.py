"""Judge-output parsers: formats, invalid cases, master keys, and a never-raise / round-trip property."""

from __future__ import annotations

import math
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrl_rm.rewards import (
    ParseResult,
    parse_listwise,
    parse_listwise_tags,
    parse_pairwise,
    parse_pairwise_scores,
    parse_pointwise,
    verdict_from_scores,
)
from test_guards import EMPTY_OUTPUTS, MASTER_KEYS

R = "<think>The response computes 16 - 3 - 4 = 9 and 9 * 2 = 18, which is correct.</think>\n"

# ----------------------------------------------------------------------------- pointwise


@pytest.mark.parametrize(
    "text,value",
    [
        (R + "<score>7</score>", 7.0),
        (R + "<score> 7 </score>", 7.0),
        (R + "<score>7.5</score>", 7.5),
        (R + "<score>.5</score>", 0.5),
        (R + "<score>0</score>", 0.0),
        (R + "<score>10</score>\n", 10.0),
        (R + "<score>+3</score>", 3.0),
        ("The chat template opened the think block. 9*2=18 is right.</think><score>9</score>", 9.0),
        (R + "<score>4</score> Wait, re-checking: <score>6</score>", 6.0),  # last wins
        (R + "<score>6</score> <score>n/a</score>", 6.0),  # last *well-formed* wins
    ],
)
def test_pointwise_valid(text, value):
    r = parse_pointwise(text)
    assert r.valid and r.reason == "ok" and r.value == value
    assert isinstance(r, ParseResult) and r.reasoning
    assert text[r.span[0] : r.span[1]].startswith("<score>")


@pytest.mark.parametrize(
    "text,kwargs,reason",
    [
        (R + "no score here", {}, "missing_tag"),
        (R + "<score>seven</score>", {}, "not_a_number"),
        (R + "<score>7/10</score>", {}, "not_a_number"),
        (R + "<score>1e1</score>", {}, "not_a_number"),
        (R + "<score>11</score>", {}, "out_of_range"),
        (R + "<score>-1</score>", {}, "out_of_range"),
        (R + "<score>0.5</score>", {"max_score": 1, "integer": True}, "not_integer"),
        (R + "<score>2</score>", {"max_score": 1, "integer": True}, "out_of_range"),
        ("<score>7</score>", {}, "no_reasoning"),
        ("<think></think><score>7</score>", {}, "no_reasoning"),
        ("<think>   </think><score>7</score>", {}, "no_reasoning"),
        ("<think> ... : !</think><score>7</score>", {}, "no_reasoning"),
        ("<think>Thought process:</think><score>7</score>", {}, "no_reasoning"),
        ("<think>Let's solve this problem step by step.</think><score>7</score>", {}, "no_reasoning"),
        ("Thought process: <score>7</score>", {}, "no_reasoning"),
        ("<think>fine<score>7</score></think>", {}, "no_reasoning"),  # answer inside the thinking
        (R + "<score>7</score>" + " and now some more text that goes on and on", {}, "trailing_text"),
        (R + "<score>7</score>" + "x" * 33, {}, "trailing_text"),
        (R + "<Score>7</Score>", {}, "missing_tag"),
        (R + "<score>٣</score>", {}, "not_a_number"),  # ASCII digits only
    ],
)
def test_pointwise_invalid(text, kwargs, reason):
    r = parse_pointwise(text, **kwargs)
    assert not r.valid and r.value is None and r.reason == reason


def test_pointwise_options():
    assert parse_pointwise("<score>7</score>", require_reasoning=False).value == 7.0
    assert parse_pointwise(R + "<score>7</score>" + "x" * 33, max_trailing_chars=100).valid
    assert parse_pointwise(R + "<score>7</score>  \n\n  ", max_trailing_chars=0).valid  # whitespace is free
    assert parse_pointwise(R + "<rating>3</rating>", tag="rating").value == 3.0
    assert parse_pointwise("I checked each step. <score>1</score>", think_tags=None, max_score=1).value == 1.0
    assert parse_pointwise("Score: <score>1</score>", think_tags=None, max_score=1).reason == "no_reasoning"
    assert parse_pointwise(R + "<score>55</score>", min_score=1, max_score=100).value == 55.0


# ----------------------------------------------------------------------------- pairwise


@pytest.mark.parametrize(
    "text,value",
    [
        (R + "<answer>[[A]]</answer>", "A"),
        (R + "<answer> [[B]] </answer>", "B"),
        (R + "<answer>[[B]]</answer> hmm <answer>[[A]]</answer>", "A"),
        (R + "<answer>[[A]]</answer><answer>[[maybe]]</answer>", "A"),
    ],
)
def test_pairwise_valid(text, value):
    r = parse_pairwise(text)
    assert r.valid and r.value == value


@pytest.mark.parametrize(
    "text,reason",
    [
        (R + "<answer>A</answer>", "not_a_verdict"),
        (R + "<answer>[[C]]</answer>", "not_a_verdict"),
        (R + "[[A]]", "missing_tag"),
        ("<answer>[[A]]</answer>", "no_reasoning"),
        ("<think></think><answer>[[A]]</answer>", "no_reasoning"),
    ],
)
def test_pairwise_invalid(text, reason):
    r = parse_pairwise(text)
    assert not r.valid and r.reason == reason


def test_pairwise_tie_label():
    assert parse_pairwise(R + "<answer>[[C]]</answer>", verdicts=("A", "B", "C")).value == "C"


def test_pairwise_scores():
    r = parse_pairwise_scores(R + "<score_A>8</score_A> <score_B>3.5</score_B>")
    assert r.valid and r.value == (8.0, 3.5)
    assert verdict_from_scores(r).value == "A"
    r2 = parse_pairwise_scores(R + "<score_B>9</score_B><score_A>2</score_A>")  # order of tags is free
    assert r2.value == (2.0, 9.0) and verdict_from_scores(r2).value == "B"
    tie = verdict_from_scores(parse_pairwise_scores(R + "<score_A>5</score_A><score_B>5</score_B>"))
    assert not tie.valid and tie.reason == "tie"
    assert parse_pairwise_scores(R + "<score_A>8</score_A>").reason == "missing_tag"
    assert parse_pairwise_scores(R + "<score_A>8</score_A><score_B>12</score_B>").reason == "out_of_range"
    assert parse_pairwise_scores("<score_A>8</score_A><score_B>2</score_B>").reason == "no_reasoning"
    assert not verdict_from_scores(parse_pairwise_scores(":")).valid


# ----------------------------------------------------------------------------- listwise


def test_listwise_boxed():
    r = parse_listwise(R + r"Scores: \boxed{7, 3, 9}", n=3)
    assert r.valid and r.value == (7.0, 3.0, 9.0)
    assert parse_listwise(R + r"\boxed{7,3,9}").value == (7.0, 3.0, 9.0)  # n=None: any count
    assert parse_listwise(R + r"\boxed{7, 3}", n=3).reason == "wrong_count"
    assert parse_listwise(R + r"\boxed{7, 3, 11}", n=3).reason == "out_of_range"
    assert parse_listwise(R + r"\boxed{7, x, 1}", n=3).reason == "not_a_number"
    assert parse_listwise(R + r"\boxed{\frac{1}{2}, 3}", n=2).reason == "not_a_number"
    assert parse_listwise(R + "Scores: 7, 3, 9", n=3).reason == "missing_tag"
    assert parse_listwise(R + r"\boxed{1, 2} then \boxed{3, 4}", n=2).value == (3.0, 4.0)
    assert parse_listwise(R + r"\boxed{1, 2} then \boxed{oops}", n=2).value == (1.0, 2.0)
    assert parse_listwise(r"\boxed{7, 3}", n=2).reason == "no_reasoning"
    # URPO template: no think tags, free-text analysis before the box
    urpo = dict(think_tags=None)
    assert parse_listwise(r"Response 1 is correct, 2 is not. Scores: \boxed{9, 2}", n=2, **urpo).value == (9.0, 2.0)
    assert parse_listwise(r"Scores: \boxed{9, 2}", n=2, **urpo).reason == "no_reasoning"
    assert parse_listwise(r"\boxed{9, 2}", n=2, **urpo).reason == "no_reasoning"
    assert parse_listwise(r"**Final Scores:** \boxed{9, 2}", n=2, **urpo).reason == "no_reasoning"


def test_listwise_tags():
    text = R + "<score_1>7</score_1> <score_2>3</score_2> <score_3>9.5</score_3>"
    r = parse_listwise_tags(text, n=3)
    assert r.valid and r.value == (7.0, 3.0, 9.5)
    assert parse_listwise_tags(R + "<score_2>3</score_2><score_1>7</score_1>", n=2).value == (7.0, 3.0)
    assert parse_listwise_tags(text, n=2).reason == "wrong_count"  # extra index 3
    assert parse_listwise_tags(text, n=4).reason == "wrong_count"  # index 4 missing
    assert parse_listwise_tags(R + "<score_1>7</score_2>", n=1).reason == "not_a_number"
    assert parse_listwise_tags(R + "nothing", n=2).reason == "missing_tag"
    assert parse_listwise_tags(R + "<score_1>1</score_1>", n=0).reason == "wrong_count"


# ----------------------------------------------------------------------------- master keys

ALL_PARSERS = [
    ("pointwise", lambda t: parse_pointwise(t)),
    ("pointwise_correctness", lambda t: parse_pointwise(t, max_score=1, integer=True)),
    ("pairwise", lambda t: parse_pairwise(t)),
    ("pairwise_scores", lambda t: parse_pairwise_scores(t)),
    ("listwise", lambda t: parse_listwise(t, n=2)),
    ("listwise_urpo", lambda t: parse_listwise(t, n=2, think_tags=None)),
    ("listwise_tags", lambda t: parse_listwise_tags(t, n=2)),
]

# valid tag(s) with nothing (or a master key) before them, for each parser
BARE_ANSWERS = [
    "<score>1</score>",
    "<think></think><score>1</score>",
    "<think>:</think><score>1</score>",
    "Thought process:<score>1</score>",
    "<answer>[[A]]</answer>",
    "<think> . </think><answer>[[A]]</answer>",
    "<score_A>9</score_A><score_B>1</score_B>",
    r"\boxed{9, 1}",
    r"Scores: \boxed{9, 1}",
    r"Let's solve this problem step by step. \boxed{9, 1}",
    "<score_1>9</score_1><score_2>1</score_2>",
    "<think>Solution</think><score_1>9</score_1><score_2>1</score_2>",
]


@pytest.mark.parametrize("name,parse", ALL_PARSERS, ids=[n for n, _ in ALL_PARSERS])
def test_master_keys_get_nothing(name, parse):
    for text in MASTER_KEYS + EMPTY_OUTPUTS + BARE_ANSWERS:
        r = parse(text)
        assert not r.valid and r.value is None, (name, text, r)
        assert r.reason in ("empty", "master_key", "no_reasoning", "missing_tag", "not_a_verdict", "not_a_number")
    for text in MASTER_KEYS:
        assert parse(text).reason in ("master_key", "empty")


@pytest.mark.parametrize("bad", [None, 3, b"<score>1</score>", ["<score>1</score>"]])
def test_non_text_input(bad):
    for _, parse in ALL_PARSERS:
        r = parse(bad)
        assert not r.valid and r.reason == "not_text"


# ----------------------------------------------------------------------------- property test
# Oracles below re-find the answer with plain string scanning (no parser code) and check that
# every valid result's value is the number(s) written in the text.

_NUM = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)\s*")


def _num(s: str) -> float | None:
    return float(s) if _NUM.fullmatch(s) and "<" not in s else None


def _well_formed_tags(text: str, tag: str) -> list[tuple[int, int, float]]:
    """All <tag>number</tag> occurrences, by string search."""
    out, open_, close = [], f"<{tag}>", f"</{tag}>"
    i = text.find(open_)
    while i >= 0:
        j = text.find(close, i + len(open_))
        if j >= 0:
            content = text[i + len(open_) : j]
            if "<" not in content and len(content) <= 256 and _num(content) is not None:
                out.append((i, j + len(close), _num(content)))
        i = text.find(open_, i + 1)
    return out


def _check_pointwise(text, r, lo=0.0, hi=10.0):
    tags = _well_formed_tags(text, "score")
    assert tags, text
    start, end, v = tags[-1]
    assert r.value == v and r.span == (start, end) and lo <= v <= hi
    assert len(text[end:].strip()) <= 32


def _check_pairwise(text, r):
    ms = [m for m in re.finditer(r"<answer>\s*\[\[(A|B)\]\]\s*</answer>", text)]
    assert ms and ms[-1].group(1) == r.value and r.span == (ms[-1].start(), ms[-1].end())


def _check_pairwise_scores(text, r):
    a, b = _well_formed_tags(text, "score_A"), _well_formed_tags(text, "score_B")
    assert a and b and r.value == (a[-1][2], b[-1][2])


def _check_listwise(text, r, n):
    boxes = []
    i = text.find("\\boxed{")
    while i >= 0:
        j = text.find("}", i)
        content = text[i + 7 : j] if j >= 0 else None
        if content is not None and "{" not in content:
            parts = content.split(",")
            if all(_num(p) is not None for p in parts):
                boxes.append((i, j + 1, tuple(float(p) for p in parts)))
        i = text.find("\\boxed{", i + 1)
    assert boxes and boxes[-1][2] == r.value and len(r.value) == n
    assert r.span == boxes[-1][:2]


def _check_listwise_tags(text, r, n):
    vals = tuple(_well_formed_tags(text, f"score_{i}")[-1][2] for i in range(1, n + 1))
    assert vals == r.value


def _check_all(text):
    results = []

    def run(r, check=None, *args):
        results.append(r)
        if r.valid and check is not None:
            check(text, r, *args)

    run(parse_pointwise(text), _check_pointwise)
    r = parse_pointwise(text, max_score=1, integer=True, require_reasoning=False, max_trailing_chars=10**6)
    run(r)
    assert not r.valid or r.value in (0.0, 1.0)
    run(parse_pairwise(text), _check_pairwise)
    run(parse_pairwise_scores(text), _check_pairwise_scores)
    for n in (2, 3):
        run(parse_listwise(text, n=n), _check_listwise, n)
        run(parse_listwise(text, n=n, think_tags=None), _check_listwise, n)
        run(parse_listwise_tags(text, n=n), _check_listwise_tags, n)
    for r in results:
        assert isinstance(r, ParseResult) and isinstance(r.reason, str)
        assert r.valid == (r.reason == "ok") and (r.value is None) != r.valid
        if r.valid and isinstance(r.value, float):
            assert math.isfinite(r.value)


_TAGGY = st.text(alphabet=st.sampled_from(list("<>/[]{}\\,.:+- \n0123456789ABscoreanswthik_x")), max_size=120)

# Mutations of valid outputs are driven by one drawn seed (python `random`): far cheaper per
# example than nested hypothesis draws, and still reproducible from the printed falsifying seed.
_REASONS = ["A is right since 2+2=4.", "ok", "Response 1 has an error"] * 8 + ["", " ", ":", "Thought process:", "<think>", "\n"]
_NUMS = ["0", "1", "7", "7.5", "10", " 3 ", ".5", "7.", "+2", "0001"] * 5 + ["11", "-1", "1e1", "x", "٣", "", "9" * 400]
_SNIPPETS = ["<think>", "</think>", "<score>", "</score>", "<answer>", "</answer>", "[[A]]", "[[B]]", "\\boxed{",
             "}", "{", ",", "<score_A>", "</score_B>", "<score_1>", "</score_2>", "<", ">", "5", " ", "\n", "Scores:"]
_CHARS = "<>/[]{}\\,.:+- \n0123456789ABscoreanswthik_x\u00e9\u4e2d\U0001f600\x00"


def _valid_output(rnd: random.Random) -> str:
    think = f"<think>{rnd.choice(_REASONS)}</think>" if rnd.random() < 0.9 else rnd.choice(_REASONS)
    kind = rnd.choice(["point", "pair", "pscores", "box", "tags"])
    num = lambda: rnd.choice(_NUMS)  # noqa: E731
    if kind == "point":
        ans = f"<score>{num()}</score>"
    elif kind == "pair":
        ans = f"<answer>{rnd.choice([' [[A]] ', '[[B]]', '[[A]]', '[[C]]', 'A', '[[A]'])}</answer>"
    elif kind == "pscores":
        ans = f"<score_A>{num()}</score_A> <score_B>{num()}</score_B>"
    elif kind == "box":
        ans = "Scores: \\boxed{" + ", ".join(num() for _ in range(rnd.choice([1, 2, 2, 3, 3, 4]))) + "}"
    else:
        ans = " ".join(f"<score_{i}>{num()}</score_{i}>" for i in range(1, rnd.choice([1, 2, 2, 3, 3, 4]) + 1))
    return think + "\n" + ans + rnd.choice(["", "", "", "\n", " Done.", "x" * 40])


def _junk(rnd: random.Random) -> str:
    return "".join(rnd.choice(_SNIPPETS) if rnd.random() < 0.3 else rnd.choice(_CHARS) for _ in range(rnd.randint(0, 12)))


def _mutated(seed: int) -> str:
    rnd = random.Random(seed)
    s = _valid_output(rnd)
    for _ in range(rnd.choice([0, 0, 0, 1, 1, 2, 3, 4])):
        op = rnd.choice(["insert", "delete", "replace", "dup", "truncate", "prefix", "suffix", "swap"])
        i = rnd.randint(0, len(s))
        j = rnd.randint(i, min(len(s), i + 12))
        if op == "insert":
            s = s[:i] + _junk(rnd) + s[i:]
        elif op == "delete":
            s = s[:i] + s[j:]
        elif op == "replace":
            s = s[:i] + rnd.choice(_CHARS) + s[i + 1 :]
        elif op == "dup":
            s = s[:j] + s[i:j] + s[j:]
        elif op == "truncate":
            s = s[:i]
        elif op == "prefix":
            s = _junk(rnd) + s
        elif op == "suffix":
            s = s + _junk(rnd)
        else:
            s = s[i:] + s[:i]
    return s


@settings(max_examples=10_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=200), _TAGGY), st.integers(0, 2**32 - 1))
def test_parsers_never_raise_and_round_trip(text, seed):
    """Each example checks one arbitrary string and one mutation of a valid output."""
    _check_all(text)
    _check_all(_mutated(seed))


def test_mutations_cover_valid_and_invalid():
    parsers = [p for _, p in ALL_PARSERS]
    results = [[p(_mutated(s)) for p in parsers] for s in range(2000)]
    assert sum(any(r.valid for r in rs) for rs in results) > 300  # the round trip is really exercised
    assert len({r.reason for rs in results for r in rs}) >= 10


def test_adversarial_long_inputs_are_fast():
    """No super-linear backtracking on long adversarial text. Measured in CPU time of this
    process (`time.process_time`), which other jobs on a shared machine do not inflate: about
    0.1 s here; a quadratic scan takes minutes."""
    import time

    evil = ["<score>" * 20000, "<think>" * 20000 + "</think>" * 20000, "\\boxed{" * 20000, "<score_1>" * 20000,
            R + "<score>" + "9" * 5000 + "</score>", "\\boxed{" + "1," * 10000 + "1}"]
    t0 = time.process_time()
    for text in evil:
        for _, parse in ALL_PARSERS:
            r = parse(text)
            assert isinstance(r, ParseResult)
    assert time.process_time() - t0 < 5.0
