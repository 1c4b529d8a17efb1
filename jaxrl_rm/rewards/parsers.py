r"""Parsers of judge outputs. They never raise: every call returns a :class:`ParseResult`.

Formats (the judge templates in :mod:`.judges` ask for exactly these):

==========================  ===========================================================  ===================
parser                      expected output                                              ``value``
==========================  ===========================================================  ===================
:func:`parse_pointwise`     ``<think>…</think> <score>7</score>``                        ``7.0``
:func:`parse_pairwise`      ``<think>…</think> <answer>[[A]]</answer>``                  ``"A"``
:func:`parse_pairwise_scores` ``<think>…</think> <score_A>8</score_A> <score_B>3</score_B>``  ``(8.0, 3.0)``
:func:`parse_listwise`      ``<think>…</think> Scores: \boxed{7, 3, 9}`` (URPO)          ``(7.0, 3.0, 9.0)``
:func:`parse_listwise_tags` ``<think>…</think> <score_1>7</score_1> <score_2>3</score_2>``  ``(7.0, 3.0)``
==========================  ===========================================================  ===================

Rules shared by all parsers:

* **Numbers** are plain ASCII decimals: ``7``, ``-2``, ``+3``, ``7.5``, ``.5``, ``7.`` (no fractions,
  exponents, words or units). Whitespace around a number inside its tag is allowed
  (``<score> 7 </score>``). Tags are case-sensitive.
* **The last well-formed answer wins** (as in J1): if the output contains several
  ``<score>…</score>`` tags, the last one whose content is a number is used; a later malformed
  tag is just trailing text. Range and count checks apply to the winner only.
* **Trailing text**: at most ``max_trailing_chars`` characters (after stripping whitespace) may
  follow the end of the final answer; more → ``trailing_text``. Use a large value to disable.
* **Reasoning** (``require_reasoning=True`` by default): with ``think_tags=("<think>",
  "</think>")`` the reasoning is the content of the last ``<think>…</think>`` block that closes
  before the answer (if the opening tag is missing — it may sit in the prompt — the text from
  the start up to ``</think>``). With ``think_tags=None`` it is all text before the answer,
  minus a trailing label such as ``Scores:`` / ``Answer:``. Reasoning must hold a letter or
  digit and must not be a master-key phrase (``Thought process:``, see :mod:`.guards`);
  otherwise → ``no_reasoning``. ``<think></think><score>5</score>`` is invalid.
* **Master keys**: an output that is empty (``empty``) or a master key (``master_key``:
  ``":"``, ``"."``, ``"Solution"``, …) is invalid before any tag is looked at.

Reasons (``result.reason``): ``ok``, ``not_text``, ``empty``, ``master_key``, ``missing_tag``,
``not_a_number``, ``not_a_verdict``, ``out_of_range``, ``not_integer``, ``wrong_count``,
``no_reasoning``, ``trailing_text``, ``parser_error`` (a bug safety net: parsers catch every
exception).

>>> parse_pointwise("<think>Correct and clear.</think><score>8</score>")
ParseResult(valid=True, value=8.0, reason='ok', reasoning='Correct and clear.', span=(33, 49))
>>> parse_pointwise("<score>8</score>").reason
'no_reasoning'
>>> parse_pairwise("<think>B misses a step.</think> <answer> [[A]] </answer>").value
'A'
>>> parse_listwise(r"<think>2 is best.</think> Scores: \boxed{3, 9}", n=2).value
(3.0, 9.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Generic, Sequence, TypeVar

from jaxrl_rm.rewards import guards

T = TypeVar("T")

# ----------------------------------------------------------------------------- reasons

OK = "ok"
NOT_TEXT = "not_text"
EMPTY = guards.EMPTY
MASTER_KEY = guards.MASTER_KEY
NO_REASONING = guards.NO_REASONING
MISSING_TAG = "missing_tag"
NOT_A_NUMBER = "not_a_number"
NOT_A_VERDICT = "not_a_verdict"
OUT_OF_RANGE = "out_of_range"
NOT_INTEGER = "not_integer"
WRONG_COUNT = "wrong_count"
TRAILING_TEXT = "trailing_text"
PARSER_ERROR = "parser_error"

THINK_TAGS: tuple[str, str] = ("<think>", "</think>")
DEFAULT_MAX_TRAILING_CHARS = 32

#: A plain decimal number (the only score syntax accepted).
NUMBER_PATTERN = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_NUMBER_RE = re.compile(rf"\s*({NUMBER_PATTERN})\s*")
# Bound on characters inside a tag / box when scanning (keeps the scan linear on adversarial text).
_MAX_TAG_CONTENT = 256
_MAX_BOX_CONTENT = 8192


@dataclasses.dataclass(frozen=True)
class ParseResult(Generic[T]):
    """Outcome of parsing one model output.

    Attributes:
      valid: True when the output follows the format and every check passed.
      value: the parsed answer (``float`` score, ``"A"``/``"B"`` verdict, tuple of scores) when
        valid, else ``None``.
      reason: ``"ok"`` or why the output is invalid (see module docstring).
      reasoning: the reasoning text found before the answer (``None`` if not looked at).
      span: ``(start, end)`` character span of the final answer in the text (for multi-tag
        formats: from the first used tag to the end of the last), when an answer was found.
    """

    valid: bool
    value: T | None
    reason: str
    reasoning: str | None = None
    span: tuple[int, int] | None = None

    @classmethod
    def invalid(cls, reason: str, reasoning: str | None = None, span: tuple[int, int] | None = None) -> "ParseResult[T]":
        return cls(False, None, reason, reasoning, span)


# ----------------------------------------------------------------------------- helpers


def _safe(fn: Callable[..., ParseResult]) -> Callable[..., ParseResult]:
    """Decorator: never raise; non-strings are ``not_text``; master keys/empty rejected first."""

    @functools.wraps(fn)
    def wrapper(text: Any, *args: Any, **kwargs: Any) -> ParseResult:
        if not isinstance(text, str):
            return ParseResult.invalid(NOT_TEXT)
        if not text.strip():
            return ParseResult.invalid(EMPTY)
        try:
            if guards.is_master_key(text):
                return ParseResult.invalid(MASTER_KEY)
            return fn(text, *args, **kwargs)
        except Exception:  # noqa: BLE001 - parsers must never raise on model output
            return ParseResult.invalid(PARSER_ERROR)

    return wrapper


def _parse_number(s: str) -> float | None:
    m = _NUMBER_RE.fullmatch(s)
    if m is None:
        return None
    v = float(m.group(1))
    return v if math.isfinite(v) else None


def _tag_re(tag: str) -> re.Pattern[str]:
    t = re.escape(tag)
    return re.compile(rf"<{t}>([^<]{{0,{_MAX_TAG_CONTENT}}})</{t}>")


_LABEL_RE = re.compile(
    r"(?:\*\*|#+\s*)?(?:final\s+)?(?:scores?|answer|verdict|judg(?:e)?ment|rating)\s*(?:\*\*)?\s*[:：]?\s*(?:\*\*)?\s*$",
    re.IGNORECASE,
)


def _reasoning_before(
    text: str, answer_start: int, think_tags: tuple[str, str] | None
) -> str | None:
    """Reasoning text that precedes ``answer_start`` (None when there is none at all)."""
    head = text[:answer_start]
    if think_tags is None:
        return _LABEL_RE.sub("", head).strip()
    open_tag, close_tag = think_tags
    close = head.rfind(close_tag)
    if close < 0:
        return None
    open_ = head.rfind(open_tag, 0, close)
    start = 0 if open_ < 0 else open_ + len(open_tag)
    return head[start:close].strip()


def _check_reasoning(reasoning: str | None) -> bool:
    return reasoning is not None and guards.has_content(reasoning) and not guards.is_master_key(reasoning)


def _finish(
    text: str,
    value: Any,
    start: int,
    end: int,
    *,
    require_reasoning: bool,
    think_tags: tuple[str, str] | None,
    max_trailing_chars: int,
    pre_error: str | None = None,
) -> ParseResult:
    """Common tail checks: trailing text, reasoning, then the value check result ``pre_error``."""
    reasoning = _reasoning_before(text, start, think_tags)
    span = (start, end)
    if len(text[end:].strip()) > max_trailing_chars:
        return ParseResult.invalid(TRAILING_TEXT, reasoning, span)
    if require_reasoning and not _check_reasoning(reasoning):
        return ParseResult.invalid(NO_REASONING, reasoning, span)
    if pre_error is not None:
        return ParseResult.invalid(pre_error, reasoning, span)
    return ParseResult(True, value, OK, reasoning, span)


def _range_error(values: Sequence[float], min_score: float, max_score: float, integer: bool) -> str | None:
    for v in values:
        if not (min_score <= v <= max_score):
            return OUT_OF_RANGE
    if integer and any(v != math.floor(v) for v in values):
        return NOT_INTEGER
    return None


def _last_number_tag(text: str, tag: str) -> tuple[float, int, int] | None | str:
    """Last ``<tag>number</tag>``: (value, start, end); the reason string when none is well formed."""
    last = None
    for m in _tag_re(tag).finditer(text):
        v = _parse_number(m.group(1))
        if v is not None:
            last = (v, m.start(), m.end())
    if last is not None:
        return last
    return NOT_A_NUMBER if f"<{tag}>" in text else MISSING_TAG


# ----------------------------------------------------------------------------- pointwise


@_safe
def parse_pointwise(
    text: str,
    *,
    min_score: float = 0.0,
    max_score: float = 10.0,
    integer: bool = False,
    tag: str = "score",
    require_reasoning: bool = True,
    think_tags: tuple[str, str] | None = THINK_TAGS,
    max_trailing_chars: int = DEFAULT_MAX_TRAILING_CHARS,
) -> ParseResult[float]:
    """Pointwise judgment: ``<think>reasoning</think>`` then ``<score>x</score>``.

    ``x`` must be a plain number in ``[min_score, max_score]`` (an integer if ``integer``).
    For correctness judgments use ``min_score=0, max_score=1, integer=True``.

    >>> parse_pointwise("<think>Right answer, sound steps.</think>\\n<score> 9 </score>").value
    9.0
    >>> parse_pointwise("<think>ok</think><score>11</score>").reason
    'out_of_range'
    >>> parse_pointwise("<think>hmm</think><score>4</score> wait <score>6</score>").value  # last wins
    6.0
    """
    found = _last_number_tag(text, tag)
    if isinstance(found, str):
        return ParseResult.invalid(found)
    v, start, end = found
    return _finish(
        text, v, start, end,
        require_reasoning=require_reasoning, think_tags=think_tags, max_trailing_chars=max_trailing_chars,
        pre_error=_range_error([v], min_score, max_score, integer),
    )


# ----------------------------------------------------------------------------- pairwise


@_safe
def parse_pairwise(
    text: str,
    *,
    verdicts: Sequence[str] = ("A", "B"),
    tag: str = "answer",
    require_reasoning: bool = True,
    think_tags: tuple[str, str] | None = THINK_TAGS,
    max_trailing_chars: int = DEFAULT_MAX_TRAILING_CHARS,
) -> ParseResult[str]:
    """Pairwise verdict: ``<think>…</think>`` then ``<answer>[[A]]</answer>`` or ``[[B]]``.

    Spaces are allowed around ``[[X]]`` inside the tag; ``X`` must be one of ``verdicts``
    (add ``"C"`` for a tie option). Value: the verdict string.

    >>> parse_pairwise("<think>A is correct, B is not.</think><answer>[[A]]</answer>").value
    'A'
    >>> parse_pairwise("<think>A is correct.</think><answer>A</answer>").reason
    'not_a_verdict'
    """
    t = re.escape(tag)
    pattern = re.compile(rf"<{t}>\s*\[\[([^\]<]{{0,{_MAX_TAG_CONTENT}}})\]\]\s*</{t}>")
    allowed = set(verdicts)
    last = None
    for m in pattern.finditer(text):
        if m.group(1) in allowed:
            last = m
    if last is None:
        return ParseResult.invalid(NOT_A_VERDICT if f"<{tag}>" in text else MISSING_TAG)
    return _finish(
        text, last.group(1), last.start(), last.end(),
        require_reasoning=require_reasoning, think_tags=think_tags, max_trailing_chars=max_trailing_chars,
    )


@_safe
def parse_pairwise_scores(
    text: str,
    *,
    min_score: float = 0.0,
    max_score: float = 10.0,
    integer: bool = False,
    tags: tuple[str, str] = ("score_A", "score_B"),
    require_reasoning: bool = True,
    think_tags: tuple[str, str] | None = THINK_TAGS,
    max_trailing_chars: int = DEFAULT_MAX_TRAILING_CHARS,
) -> ParseResult[tuple[float, float]]:
    """Pairwise scores: ``<think>…</think>`` then ``<score_A>x</score_A> <score_B>y</score_B>``.

    Each tag's last well-formed occurrence is used; both must be present and in range.
    Reasoning must close before the first of the two tags; trailing text is measured after the
    later one. Value: ``(score_A, score_B)``; see :func:`verdict_from_scores`.

    >>> parse_pairwise_scores("<think>A is right.</think><score_A>9</score_A><score_B>2</score_B>").value
    (9.0, 2.0)
    """
    found = [_last_number_tag(text, tg) for tg in tags]
    for f in found:
        if isinstance(f, str):
            return ParseResult.invalid(f)
    values = tuple(f[0] for f in found)  # type: ignore[index]
    start = min(f[1] for f in found)  # type: ignore[index]
    end = max(f[2] for f in found)  # type: ignore[index]
    return _finish(
        text, values, start, end,
        require_reasoning=require_reasoning, think_tags=think_tags, max_trailing_chars=max_trailing_chars,
        pre_error=_range_error(values, min_score, max_score, integer),
    )


def verdict_from_scores(result: ParseResult, labels: tuple[str, str] = ("A", "B")) -> ParseResult[str]:
    """Turn a valid pairwise-scores result into a verdict: the higher score wins.

    Equal scores give ``reason="tie"`` (invalid as a verdict); invalid input passes through.
    """
    if not result.valid or result.value is None:
        return ParseResult.invalid(result.reason, result.reasoning, result.span)
    a, b = result.value
    if a == b:
        return ParseResult.invalid("tie", result.reasoning, result.span)
    return ParseResult(True, labels[0] if a > b else labels[1], OK, result.reasoning, result.span)


# ----------------------------------------------------------------------------- listwise

_BOX_RE = re.compile(rf"\\boxed\{{([^{{}}]{{0,{_MAX_BOX_CONTENT}}})\}}")
_LIST_RE = re.compile(rf"\s*{NUMBER_PATTERN}\s*(?:,\s*{NUMBER_PATTERN}\s*)*")


@_safe
def parse_listwise(
    text: str,
    n: int | None = None,
    *,
    min_score: float = 0.0,
    max_score: float = 10.0,
    integer: bool = False,
    require_reasoning: bool = True,
    think_tags: tuple[str, str] | None = THINK_TAGS,
    max_trailing_chars: int = DEFAULT_MAX_TRAILING_CHARS,
) -> ParseResult[tuple[float, ...]]:
    r"""Listwise (URPO) scores of ``n`` responses in one box: ``\boxed{s1, s2, ..., sN}``.

    The last ``\boxed{…}`` whose content is a comma-separated list of plain numbers wins; it
    must hold exactly ``n`` numbers (any count >= 1 if ``n`` is None), each in range. The URPO
    template has no think tags: use ``think_tags=None`` to take all text before the box (minus a
    ``Scores:`` label) as the reasoning.

    >>> parse_listwise(r"<think>R2 has an error.</think>Scores: \boxed{8, 3}", n=2).value
    (8.0, 3.0)
    >>> parse_listwise(r"<think>R2 has an error.</think>\boxed{8, 3}", n=3).reason
    'wrong_count'
    >>> parse_listwise(r"Response 1 is wrong, 2 is right. Scores: \boxed{2,9}", n=2, think_tags=None).value
    (2.0, 9.0)
    """
    last = None
    for m in _BOX_RE.finditer(text):
        if _LIST_RE.fullmatch(m.group(1)):
            last = m
    if last is None:
        return ParseResult.invalid(NOT_A_NUMBER if "\\boxed" in text else MISSING_TAG)
    values = tuple(float(x) for x in last.group(1).split(","))
    error = None
    if not all(math.isfinite(v) for v in values):
        error = OUT_OF_RANGE
    elif n is not None and len(values) != n:
        error = WRONG_COUNT
    else:
        error = _range_error(values, min_score, max_score, integer)
    return _finish(
        text, values, last.start(), last.end(),
        require_reasoning=require_reasoning, think_tags=think_tags, max_trailing_chars=max_trailing_chars,
        pre_error=error,
    )


_INDEXED_TAG_CACHE: dict[str, re.Pattern[str]] = {}


@_safe
def parse_listwise_tags(
    text: str,
    n: int,
    *,
    min_score: float = 0.0,
    max_score: float = 10.0,
    integer: bool = False,
    tag_prefix: str = "score_",
    require_reasoning: bool = True,
    think_tags: tuple[str, str] | None = THINK_TAGS,
    max_trailing_chars: int = DEFAULT_MAX_TRAILING_CHARS,
) -> ParseResult[tuple[float, ...]]:
    """Listwise scores in per-response tags: ``<score_1>x</score_1> … <score_N>x</score_N>``.

    For each ``i`` in ``1..n`` the last well-formed ``<score_i>`` wins. A missing index, or a
    well-formed tag with an index outside ``1..n``, gives ``wrong_count``.

    >>> parse_listwise_tags("<think>1 ok, 2 wrong</think><score_1>7</score_1><score_2>1</score_2>", n=2).value
    (7.0, 1.0)
    """
    if not isinstance(n, int) or n < 1:
        return ParseResult.invalid(WRONG_COUNT)
    p = re.escape(tag_prefix)
    pattern = _INDEXED_TAG_CACHE.get(tag_prefix)
    if pattern is None:
        pattern = re.compile(rf"<{p}([1-9][0-9]{{0,5}})>([^<]{{0,{_MAX_TAG_CONTENT}}})</{p}\1>")
        _INDEXED_TAG_CACHE[tag_prefix] = pattern
    found: dict[int, tuple[float, int, int]] = {}
    for m in pattern.finditer(text):
        v = _parse_number(m.group(2))
        if v is not None:
            found[int(m.group(1))] = (v, m.start(), m.end())
    if not found:
        return ParseResult.invalid(NOT_A_NUMBER if f"<{tag_prefix}" in text else MISSING_TAG)
    if set(found) != set(range(1, n + 1)):
        return ParseResult.invalid(WRONG_COUNT)
    values = tuple(found[i][0] for i in range(1, n + 1))
    start = min(f[1] for f in found.values())
    end = max(f[2] for f in found.values())
    return _finish(
        text, values, start, end,
        require_reasoning=require_reasoning, think_tags=think_tags, max_trailing_chars=max_trailing_chars,
        pre_error=_range_error(values, min_score, max_score, integer),
    )


#: Parser of each judge output format (used by :class:`jaxrl_rm.rewards.judges.JudgeTemplate`).
PARSERS: dict[str, Callable[..., ParseResult]] = {
    "pointwise": parse_pointwise,
    "pairwise": parse_pairwise,
    "pairwise_scores": parse_pairwise_scores,
    "listwise": parse_listwise,
    "listwise_tags": parse_listwise_tags,
}


def parse_batch(parser: Callable[..., ParseResult], texts: Sequence[Any], **options: Any) -> list[ParseResult]:
    """Apply one parser to many outputs with the same options."""
    return [parser(t, **options) for t in texts]
