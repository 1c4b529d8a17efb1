r"""Judge prompt templates (pointwise, pairwise, pairwise-scores, listwise) and their output formats.

A :class:`JudgeTemplate` holds the prompt text, the output format it asks for, and the parser
options that check that format, so prompt and parser cannot drift apart::

    tpl = get_template("pointwise_ref", max_score=10)
    prompt_text = tpl.render(tokenizer, prompt=q, response=r, reference=ref)
    result = tpl.parse(judge_output)          # ParseResult(valid, value, reason, ...)

Built-in templates (:data:`TEMPLATE_NAMES`; each also with a ``_ref`` variant that shows a
reference answer):

=========================  ==================  =========================================================
name                       format              judge output
=========================  ==================  =========================================================
``pointwise``              ``pointwise``       ``<think>…</think> <score>x</score>``, x in [min, max] (J1)
``pointwise_correctness``  ``pointwise``       same, x ∈ {0, 1}: is the response correct (J1 / RLLM RLVR)
``pairwise``               ``pairwise``        ``<think>…</think> <answer>[[A]]</answer>`` or ``[[B]]`` (J1)
``pairwise_scores``        ``pairwise_scores`` ``<think>…</think> <score_A>x</score_A> <score_B>y</score_B>``
``listwise``               ``listwise``        analysis, then ``Scores: \boxed{s1, …, sN}`` (URPO)
``listwise_tags``          ``listwise_tags``   ``<think>…</think> <score_1>x</score_1> … <score_N>x</score_N>``
=========================  ==================  =========================================================

Wording: the listwise template is URPO's (Sec. 3.2.1) verbatim, plus one added sentence asking
for an analysis and a score range (the parser requires reasoning and checks the range). The
shared papers give J1's output tags but not its prompt text; the ``<think>``/``<score>``/
``[[A]]`` templates follow the J1 judge prompts in spirit (evaluation criteria, an ideal answer,
position- and length-bias warnings).

Placeholders — ``{name}`` in ``user`` or ``system``; only these names are substituted (other
braces, e.g. ``\boxed{x, x}``, stay literal; substituted values are never re-scanned):

=================  ========================================================================
``{prompt}``       the user question / instruction being answered (required in every format)
``{response}``     the response to judge (pointwise; required, or shown through ``{aligned}``)
``{response_a}``   first response (pairwise formats; required)
``{response_b}``   second response (pairwise formats; required)
``{responses}``    the N responses, each rendered with ``response_block`` (listwise; required)
``{reference}``    a reference answer (optional; a template that has it needs ``reference=``)
``{aligned}``      pointwise: reference and response side by side, character by character
                   (:func:`aligned_view`; needs ``reference=``) — for very small judges
``{min_score}``    lowest allowed score (``0``; integral values print without ``.0``)
``{max_score}``    highest allowed score (``10``)
``{n}``            number of responses (listwise; 2 for pairwise, 1 for pointwise)
=================  ========================================================================

``response_block`` (listwise) uses ``{i}`` (1-based index) and ``{response}``; default URPO's
``[The Begin of Response {i}]{response}[The End of Response {i}]``.

Custom templates: ``JudgeTemplate(name="mine", format="pointwise", user="... {prompt} ...
{response} ... <score>x</score> between {min_score} and {max_score}")``; missing required
placeholders raise ``ValueError`` at construction.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

from jaxrl_rm.rewards import parsers
from jaxrl_rm.rewards.parsers import DEFAULT_MAX_TRAILING_CHARS, THINK_TAGS, ParseResult

PLACEHOLDERS: tuple[str, ...] = (
    "prompt",
    "response",
    "response_a",
    "response_b",
    "responses",
    "reference",
    "aligned",
    "min_score",
    "max_score",
    "n",
)
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(sorted(PLACEHOLDERS, key=len, reverse=True)) + r")\}")
_BLOCK_RE = re.compile(r"\{(i|response)\}")

FORMATS: tuple[str, ...] = tuple(parsers.PARSERS)

#: Placeholders each format must contain (in ``user`` or ``system``).
REQUIRED_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "pointwise": ("prompt", "response"),
    "pairwise": ("prompt", "response_a", "response_b"),
    "pairwise_scores": ("prompt", "response_a", "response_b"),
    "listwise": ("prompt", "responses"),
    "listwise_tags": ("prompt", "responses"),
}

URPO_RESPONSE_BLOCK = "[The Begin of Response {i}]{response}[The End of Response {i}]"


def _fmt_num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` for the known placeholder names present in ``values``, in one pass."""

    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        return values[key] if key in values else m.group(0)

    return _PLACEHOLDER_RE.sub(repl, template)


def placeholders_in(text: str) -> set[str]:
    """Known placeholder names used in ``text``."""
    return set(_PLACEHOLDER_RE.findall(text))


ALIGN_FILL = "_"


def aligned_pairs(reference: str, response: str, width: int = 0) -> list[tuple[str, str]]:
    """Reference and response character by character: both right-padded with ``ALIGN_FILL`` to
    the longer of the two (and at least ``width``), then paired position by position. The response
    equals the reference exactly when every pair holds two equal characters."""
    n = max(len(reference), len(response), int(width))
    return list(zip(reference.ljust(n, ALIGN_FILL), response.ljust(n, ALIGN_FILL)))


def aligned_view(reference: str, response: str, width: int = 0) -> str:
    """The ``{aligned}`` placeholder: :func:`aligned_pairs` as ``<ref char><response char>``
    pairs two spaces apart, e.g. ``dd  cc  bx  a_`` for reference ``dcba`` and response ``dcx``."""
    return "  ".join(r + a for r, a in aligned_pairs(reference, response, width))


def aligned_check(reference: str, response: str, width: int = 0) -> str:
    """A character-by-character check of :func:`aligned_pairs` — each pair followed by ``=`` or
    ``x`` (``dd= cc= bxx a_x``): the reasoning the J1 warm-up teaches with ``warmup_think:
    aligned`` (its spacing lines it up with :func:`aligned_view`, so copying a pair is a fixed
    offset back)."""
    return " ".join(r + a + ("=" if r == a else "x") for r, a in aligned_pairs(reference, response, width))


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt plus the output format (and parser options) it asks for.

    Attributes:
      name: identifier (for logs and configs).
      format: one of :data:`FORMATS` — selects the parser.
      user: user-message text with ``{placeholders}``.
      system: optional system-message text (may use placeholders too).
      min_score, max_score, integer: allowed score range (and integrality) for score formats.
      require_reasoning, think_tags, max_trailing_chars: parser options (see :mod:`.parsers`).
      verdicts: allowed pairwise verdict labels.
      response_block, response_separator: how ``{responses}`` renders N responses.
      aligned_width: minimum width of the ``{aligned}`` view (pointwise templates with a reference:
        the reference and the response side by side, character by character — a presentation
        that lets a very small judge compare them, see :func:`aligned_view`).
    """

    name: str
    format: str
    user: str
    system: str | None = None
    min_score: float = 0.0
    max_score: float = 10.0
    integer: bool = False
    require_reasoning: bool = True
    think_tags: tuple[str, str] | None = THINK_TAGS
    max_trailing_chars: int = DEFAULT_MAX_TRAILING_CHARS
    verdicts: tuple[str, ...] = ("A", "B")
    response_block: str = URPO_RESPONSE_BLOCK
    response_separator: str = "\n"
    aligned_width: int = 8

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"JudgeTemplate {self.name!r}: unknown format {self.format!r}; valid: {list(FORMATS)}")
        used = self.placeholders
        if "aligned" in used and self.format != "pointwise":
            raise ValueError(f"JudgeTemplate {self.name!r}: {{aligned}} is for pointwise templates (one response)")
        shown = used | ({"response"} if "aligned" in used else set())
        missing = [p for p in REQUIRED_PLACEHOLDERS[self.format] if p not in shown]
        if missing:
            raise ValueError(
                f"JudgeTemplate {self.name!r} ({self.format}): missing placeholder(s) "
                + ", ".join("{" + m + "}" for m in missing)
                + f"; known placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        if not self.min_score <= self.max_score:
            raise ValueError(f"JudgeTemplate {self.name!r}: min_score {self.min_score} > max_score {self.max_score}")
        if self.format in ("listwise", "listwise_tags") and "{response}" not in self.response_block:
            raise ValueError(f"JudgeTemplate {self.name!r}: response_block must contain {{response}}")

    # ------------------------------------------------------------------ rendering

    @property
    def placeholders(self) -> set[str]:
        return placeholders_in(self.user) | placeholders_in(self.system or "")

    @property
    def uses_reference(self) -> bool:
        return bool({"reference", "aligned"} & self.placeholders)

    def _values(
        self,
        prompt: str,
        response: str | None,
        response_a: str | None,
        response_b: str | None,
        responses: Sequence[str] | None,
        reference: str | None,
    ) -> dict[str, str]:
        used = self.placeholders
        if self.uses_reference and reference is None:
            raise ValueError(f"template {self.name!r} shows a reference answer: pass reference=")
        if reference is not None and not self.uses_reference:
            raise ValueError(f"template {self.name!r} has no {{reference}} placeholder; use a *_ref template")
        v: dict[str, str] = {
            "prompt": prompt,
            "min_score": _fmt_num(self.min_score),
            "max_score": _fmt_num(self.max_score),
        }
        if reference is not None:
            v["reference"] = reference
        if self.format == "pointwise":
            if response is None:
                raise ValueError(f"template {self.name!r} (pointwise) needs response=")
            v["response"] = response
            v["n"] = "1"
            if "aligned" in used:
                v["aligned"] = aligned_view(reference, response, self.aligned_width)
        elif self.format in ("pairwise", "pairwise_scores"):
            if response_a is None or response_b is None:
                raise ValueError(f"template {self.name!r} ({self.format}) needs response_a= and response_b=")
            v["response_a"], v["response_b"], v["n"] = response_a, response_b, "2"
        else:
            if responses is None or isinstance(responses, str) or len(responses) < 1:
                raise ValueError(f"template {self.name!r} ({self.format}) needs responses= (a list of >= 1 strings)")
            blocks = [
                _BLOCK_RE.sub(lambda m, i=i, r=r: str(i) if m.group(1) == "i" else r, self.response_block)
                for i, r in enumerate(responses, start=1)
            ]
            v["responses"] = self.response_separator.join(blocks)
            v["n"] = str(len(responses))
        return {k: val for k, val in v.items() if k in used}

    def fill(
        self,
        *,
        prompt: str,
        response: str | None = None,
        response_a: str | None = None,
        response_b: str | None = None,
        responses: Sequence[str] | None = None,
        reference: str | None = None,
    ) -> tuple[str | None, str]:
        """Substitute the placeholders; returns ``(system_text | None, user_text)``."""
        vals = self._values(prompt, response, response_a, response_b, responses, reference)
        system = substitute(self.system, vals) if self.system is not None else None
        return system, substitute(self.user, vals)

    def messages(self, **fields: Any) -> list[dict[str, str]]:
        """Chat messages ``[{"role": "system", …}?, {"role": "user", …}]`` for :meth:`fill` fields."""
        system, user = self.fill(**fields)
        msgs = [] if system is None else [{"role": "system", "content": system}]
        msgs.append({"role": "user", "content": user})
        return msgs

    def render(self, tokenizer: Any = None, *, chat_template_kwargs: Mapping[str, Any] | None = None, **fields: Any) -> str:
        """The judge's prompt text, ready to tokenize and sample from.

        If ``tokenizer`` has a chat template: ``tokenizer.apply_chat_template(messages,
        tokenize=False, add_generation_prompt=True, **chat_template_kwargs)`` (if the chat template
        rejects a system message, the system text is prepended to the user message instead).
        Otherwise plain text: ``system + "\\n\\n" + user`` (or just ``user``).
        ``fields`` are those of :meth:`fill` (``prompt=``, ``response=``, …).
        """
        msgs = self.messages(**fields)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            kw = dict(chat_template_kwargs or {})
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
            except Exception:
                if len(msgs) == 1:
                    raise
                merged = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
                return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True, **kw)
        return "\n\n".join(m["content"] for m in msgs)

    # ------------------------------------------------------------------ parsing

    def parse_options(self) -> dict[str, Any]:
        """Keyword options of this format's parser implied by the template."""
        opts: dict[str, Any] = {
            "require_reasoning": self.require_reasoning,
            "think_tags": self.think_tags,
            "max_trailing_chars": self.max_trailing_chars,
        }
        if self.format == "pairwise":
            opts["verdicts"] = self.verdicts
        else:
            opts.update(min_score=self.min_score, max_score=self.max_score, integer=self.integer)
        return opts

    def parse(self, text: Any, n: int | None = None) -> ParseResult:
        """Parse a judge output with this template's format and options (never raises).

        ``n`` = number of responses for listwise formats (required for ``listwise_tags``).
        """
        parser = parsers.PARSERS[self.format]
        if self.format == "listwise":
            return parser(text, n, **self.parse_options())
        if self.format == "listwise_tags":
            if n is None:
                return ParseResult.invalid(parsers.WRONG_COUNT)
            return parser(text, n, **self.parse_options())
        return parser(text, **self.parse_options())

    def replace(self, **changes: Any) -> "JudgeTemplate":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ============================================================================ built-in texts

_IMPARTIAL = "Remain as objective as possible."

_POINTWISE_INTRO = (
    "You are given a user question{ref_intro} and a response from an AI assistant. Your task is to act as an "
    "impartial judge and evaluate how well the response fulfills the user's instructions. You will be shown "
    "multiple responses to the same prompt, but only one at a time. Evaluate each response independently."
)

_POINTWISE_BODY = (
    "\n\nThink carefully about how to assess the quality of the response, and enclose your reasoning within "
    "<think> and </think> tags. Your reasoning should include your evaluation criteria, a clear understanding of "
    "what an ideal response would look like for this particular question{ref_body}, and a comparison of the "
    "assistant's response with it, explaining how it aligns with or deviates from your expectations. Be specific "
    "and avoid vague or overly general judgments. " + _IMPARTIAL + "\n\n"
    "Finally, assign the assistant's response a score from {min_score} to {max_score}{precision}, with a higher "
    "score indicating a higher-quality response. Enclose the score within <score> and </score> tags.\n\n"
    "Format your output like this:\n<think> your_thinking_process </think>\n<score> your_score </score>\n\n"
    "Below are the user's question{ref_below} and the assistant's response:\n\n"
    "[User Question]\n{prompt}\n\n{ref_block}"
    "[The Start of the Assistant's Answer]\n{response}\n[The End of the Assistant's Answer]"
)

_CORRECTNESS = (
    "You are given a user question{ref_intro} and a response from an AI assistant. Your task is to act as an "
    "impartial judge and decide whether the response correctly answers the question.\n\n"
    "Think carefully and enclose your reasoning within <think> and </think> tags: work out what the correct "
    "answer is{ref_body}, check the response's reasoning and its final answer against it, and point out any "
    "error. Judge the final answer, not the style. " + _IMPARTIAL + "\n\n"
    "Finally, output {max_score} if the response is correct and {min_score} if it is incorrect, within <score> "
    "and </score> tags.\n\n"
    "Format your output like this:\n<think> your_thinking_process </think>\n<score> {min_score} or {max_score} "
    "</score>\n\n"
    "Below are the user's question{ref_below} and the assistant's response:\n\n"
    "[User Question]\n{prompt}\n\n{ref_block}"
    "[The Start of the Assistant's Answer]\n{response}\n[The End of the Assistant's Answer]"
)

_PAIRWISE_INTRO = (
    "You are given a user question{ref_intro} and two responses from two AI assistants. Your task is to act as an "
    "impartial judge and evaluate which response better follows the user's instructions and provides a "
    "higher-quality answer.\n\n"
    "First, provide your reasoning within <think> and </think> tags. This should include your evaluation "
    "criteria for a high-quality response, a detailed comparison of the two responses{ref_body}. Be explicit in "
    "your thought process, referencing your criteria and explaining how each response aligns with or deviates "
    "from them.\n\n"
    "Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do not "
    "favor certain names of the assistants. " + _IMPARTIAL + "\n\n"
)

_PAIRWISE_VERDICT = (
    "Finally, provide your verdict within <answer> and </answer> tags, strictly following this format:\n"
    "- <answer> [[A]] </answer> if Assistant A is better\n"
    "- <answer> [[B]] </answer> if Assistant B is better\n\n"
)

_PAIRWISE_SCORES = (
    "Finally, assign each assistant's response a score from {min_score} to {max_score}{precision}, with a higher "
    "score indicating a higher-quality response. Enclose the scores within <score_A> and </score_A>, and "
    "<score_B> and </score_B> tags.\n\n"
    "Format your output like this:\n<think> your_thinking_process </think>\n"
    "<score_A> your_score_a </score_A> <score_B> your_score_b </score_B>\n\n"
)

_PAIRWISE_TAIL = (
    "Below are the user's question{ref_below} and the two responses:\n\n"
    "[User Question]\n{prompt}\n\n{ref_block}"
    "[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]"
)

# URPO Sec. 3.2.1, verbatim except the added second-to-last sentence (reasoning + range).
_URPO_LISTWISE = (
    "You are a skilled expert at scoring responses. You will be given a question{ref_intro} with multiple "
    "responses. Evaluate and score each response. "
    "[The Begin of Question]{prompt}[The End of Question] {ref_block}"
    "{responses} "
    "#### Output Format Requirements #### "
    "First analyse the {n} responses{ref_body}, then give each a score from {min_score} to {max_score}. "
    "Scores: <the overall comprehensive score of all responses in order, separate by comma in the boxed, "
    "e.g., \\boxed{x, x} if there exists 2 responses>."
)

_LISTWISE_TAGS = (
    "You are given a user question{ref_intro} and {n} responses from AI assistants. Your task is to act as an "
    "impartial judge and score how well each response fulfills the user's instructions.\n\n"
    "Think carefully and enclose your reasoning within <think> and </think> tags: state your evaluation criteria, "
    "what an ideal response would look like{ref_body}, and compare every response with it. The order of the "
    "responses and their length must not influence your scores. " + _IMPARTIAL + "\n\n"
    "Finally, assign each response a score from {min_score} to {max_score}{precision}, with a higher score "
    "indicating a higher-quality response. Enclose the score of response i within <score_i> and </score_i> tags, "
    "for i = 1 to {n}.\n\n"
    "Format your output like this:\n<think> your_thinking_process </think>\n"
    "<score_1> score </score_1> ... <score_{n}> score </score_{n}>\n\n"
    "Below are the user's question{ref_below} and the responses:\n\n"
    "[User Question]\n{prompt}\n\n{ref_block}"
    "{responses}"
)

_REF_PARTS_NONE = {"ref_intro": "", "ref_body": "", "ref_below": "", "ref_block": ""}
_REF_PARTS = {
    "ref_intro": ", a reference answer",
    "ref_body": ", using the reference answer as the standard of correctness",
    "ref_below": ", the reference answer",
    "ref_block": "[Reference Answer]\n{reference}\n[End of Reference Answer]\n\n",
}
_URPO_REF_PARTS = {
    "ref_intro": " and a reference answer",
    "ref_body": " against the reference answer",
    "ref_below": "",
    "ref_block": "[The Begin of Reference Answer]{reference}[The End of Reference Answer] ",
}
_J1_BLOCK = "[The Start of Response {i}]\n{response}\n[The End of Response {i}]"


def _compose(text: str, parts: Mapping[str, str], precision: str) -> str:
    # structural slots only ({ref_*}, {precision}); the runtime placeholders are left as they are
    out = text
    for k, v in parts.items():
        out = out.replace("{" + k + "}", v)
    return out.replace("{precision}", precision)


def judge_template(
    kind: str,
    *,
    reference: bool = False,
    min_score: float | None = None,
    max_score: float | None = None,
    integer: bool | None = None,
    system: str | None = None,
    **overrides: Any,
) -> JudgeTemplate:
    """Build a built-in template.

    Args:
      kind: ``pointwise`` | ``pointwise_correctness`` | ``pairwise`` | ``pairwise_scores`` |
        ``listwise`` | ``listwise_tags``.
      reference: include a ``{reference}`` answer block (render with ``reference=``).
      min_score, max_score, integer: score range (defaults: 0–10 decimals; 0/1 integers for
        ``pointwise_correctness``).
      system: optional system message.
      overrides: other :class:`JudgeTemplate` fields (``max_trailing_chars``, ``think_tags``…).
    """
    correctness = kind == "pointwise_correctness"
    lo = 0.0 if min_score is None else float(min_score)
    hi = (1.0 if correctness else 10.0) if max_score is None else float(max_score)
    integ = correctness if integer is None else bool(integer)
    precision = " (an integer)" if integ else ", using either an integer or a decimal with up to 0.1 precision"
    parts = _REF_PARTS if reference else _REF_PARTS_NONE
    name = kind + ("_ref" if reference else "")
    kw: dict[str, Any] = dict(name=name, min_score=lo, max_score=hi, integer=integ, system=system)
    if kind == "pointwise":
        user = _compose(_POINTWISE_INTRO + _POINTWISE_BODY, parts, precision)
        kw.update(format="pointwise", user=user)
    elif correctness:
        user = _compose(_CORRECTNESS, parts, "")
        kw.update(format="pointwise", user=user)
    elif kind == "pairwise":
        user = _compose(_PAIRWISE_INTRO + _PAIRWISE_VERDICT + _PAIRWISE_TAIL, parts, precision)
        kw.update(format="pairwise", user=user)
    elif kind == "pairwise_scores":
        user = _compose(_PAIRWISE_INTRO + _PAIRWISE_SCORES + _PAIRWISE_TAIL, parts, precision)
        kw.update(format="pairwise_scores", user=user)
    elif kind == "listwise":
        user = _compose(_URPO_LISTWISE, _URPO_REF_PARTS if reference else _REF_PARTS_NONE, precision)
        # URPO has no think tags: the analysis before "Scores:" is the reasoning.
        kw.update(format="listwise", user=user, think_tags=None, response_block=URPO_RESPONSE_BLOCK, response_separator=" ")
    elif kind == "listwise_tags":
        user = _compose(_LISTWISE_TAGS, parts, precision)
        kw.update(format="listwise_tags", user=user, response_block=_J1_BLOCK, response_separator="\n\n")
    else:
        raise ValueError(f"unknown judge template kind {kind!r}; valid: {list(_KINDS)}")
    kw.update(overrides)
    return JudgeTemplate(**kw)


_KINDS = ("pointwise", "pointwise_correctness", "pairwise", "pairwise_scores", "listwise", "listwise_tags")

#: Names accepted by :func:`get_template`.
TEMPLATE_NAMES: tuple[str, ...] = tuple(k + s for k in _KINDS for s in ("", "_ref"))


def get_template(name: str, **options: Any) -> JudgeTemplate:
    """Built-in template by name (``"pairwise_ref"``, ``"listwise"``, …); ``options`` as :func:`judge_template`."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown judge template {name!r}; valid: {list(TEMPLATE_NAMES)}")
    ref = name.endswith("_ref")
    return judge_template(name[:-4] if ref else name, reference=ref, **options)


# --- templates of a task (GRPO ranking / judgment tasks) -------------------------------------
_TEMPLATES: dict = {}


def task_template(task, default: str):
    """The judge template of a ranking or judgment task: `options.template` (default `default`)
    with `options.template_options` overrides (e.g. a compact `user` text, `max_score`).

    One object per setting: what renders a task's prompts (`GRPO.prompt_text`, warm-up
    demonstrations) and what parses the answers (`RankingSource`, `score_match`) is the same
    template. `task`: a TaskSpec (`name`, `options`)."""
    name, options = task.options.get("template", default), task.options.get("template_options", {})
    key = (task.name, name, json.dumps(options, sort_keys=True, default=repr))
    if key not in _TEMPLATES:
        try:
            _TEMPLATES[key] = get_template(name, **options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"grpo.tasks[{task.name}].options.template / template_options: {e}") from e
    return _TEMPLATES[key]


def ranking_template(task):
    """The listwise template of a ranking task (default URPO's `listwise`)."""
    template = task_template(task, "listwise")
    if template.format not in ("listwise", "listwise_tags"):
        raise ValueError(f"grpo.tasks[{task.name}].options.template: a ranking task needs a listwise template "
                         f"(listwise or listwise_tags), got {template.name!r} ({template.format})")
    return template
