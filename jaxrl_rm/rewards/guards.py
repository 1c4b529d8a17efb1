"""Reward-hacking guards: cheap text checks that stop degenerate outputs from earning reward.

Generative judges and lenient verifiers can be fooled by outputs that carry no content
("One Token to Fool LLM-as-a-Judge": a lone ``:`` or ``.``, or a reasoning opener such as
``Thought process:`` makes many judges answer "correct"). The guards below run *before* a
verifier or a judge result is turned into reward, and are on by default everywhere in
:mod:`jaxrl_rm.rewards`:

==================  =====================================================================
guard name          fires when
==================  =====================================================================
``empty``           the text is empty or whitespace only
``master_key``      the text is punctuation/symbols only (``:``, ``.``, ``...``) or one of
                    the "master key" phrases in :data:`MASTER_KEY_PHRASES` (``Thought
                    process:``, ``Let's solve this problem step by step.``, ``Solution``,
                    …), compared case-, space- and end-punctuation-insensitively
``no_reasoning``    a judge output has a valid answer tag but no real reasoning before it
                    (reasoning required; set by the parsers in :mod:`.parsers`)
``no_answer``       a verifier found no final answer in the response
``prompt_echo``     the response only restates (a verbatim slice of) the prompt
``repetition``      the response is one short unit repeated (``18 18 18 18``, ``!!!!!!!!``)
==================  =====================================================================

Guards never raise. Each check returns the guard name that fired (or ``None``); results of
parsers and verifiers carry it as their ``reason``. Count them with :class:`GuardCounter` and put
``counter.report()`` into a run summary under ``"reward_guard"``::

    counter = GuardCounter()
    rewards, reasons = guard_rewards(rewards, responses, prompts, counter=counter)
    summary["reward_guard"] = counter.report()   # {"empty": 0, "master_key": 3, ...}
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- guard names

EMPTY = "empty"
MASTER_KEY = "master_key"
NO_REASONING = "no_reasoning"
NO_ANSWER = "no_answer"
PROMPT_ECHO = "prompt_echo"
REPETITION = "repetition"

#: Every guard name, in report order.
GUARD_NAMES: tuple[str, ...] = (EMPTY, MASTER_KEY, NO_REASONING, NO_ANSWER, PROMPT_ECHO, REPETITION)

#: Outputs that fool LLM judges although they say nothing (compared after :func:`normalize_text`).
#: From "One Token to Fool LLM-as-a-Judge" (reasoning openers and their translations) plus a few
#: equally content-free openers. Punctuation-only strings are caught separately.
MASTER_KEY_PHRASES: tuple[str, ...] = (
    "Thought process:",
    "Let's solve this problem step by step.",
    "Let's think step by step.",
    "Let me think step by step.",
    "Let's solve this step by step.",
    "Step by step:",
    "Solution",
    "Solution:",
    "Answer:",
    "The answer is",
    "Final answer:",
    "Reasoning:",
    "Explanation:",
    "Step 1:",
    "解",
    "解答",
    "かいせつ",
    "解説",
    "Respuesta",
    "Solución",
    "Lösung",
    "Réponse",
)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_END_PUNCT = " \t\r\n.:;,!?…。：，！？-—–*#>\"'()[]"


def normalize_text(text: str) -> str:
    """Canonical form used to compare texts with master keys and prompts.

    NFKC, casefold, straight apostrophes, collapsed whitespace, and leading/trailing
    punctuation, quotes, markdown marks and spaces removed.
    ``normalize_text("  **Thought  Process:** ") == "thought process"``.
    """
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    text = " ".join(text.split())
    return text.strip(_END_PUNCT)


_MASTER_KEYS_NORMALIZED = frozenset(normalize_text(p) for p in MASTER_KEY_PHRASES)


def has_content(text: str) -> bool:
    """True when ``text`` holds at least one letter or digit (any script)."""
    return any(ch.isalnum() for ch in text)


def is_master_key(text: Any, extra_phrases: Iterable[str] = ()) -> bool:
    """True for content-free "master key" outputs.

    That is: non-empty text made of punctuation/symbols/space only (``":"``, ``"."``,
    ``" . . "``), or a phrase of :data:`MASTER_KEY_PHRASES` (or ``extra_phrases``) up to case,
    spacing and surrounding punctuation (``"Thought process:"``, ``"SOLUTION"``,
    ``"Let’s solve this problem step by step"``). Empty text is *not* a master key (it is
    ``empty``); see :func:`check_text`.
    """
    if not isinstance(text, str) or not text.strip():
        return False
    if not has_content(text):
        return True
    norm = normalize_text(text)
    if norm in _MASTER_KEYS_NORMALIZED:
        return True
    return any(norm == normalize_text(p) for p in extra_phrases)


_WORD_RE = re.compile(r"\w+", re.UNICODE)


def _smallest_period(seq: Sequence[Any], max_period: int) -> int | None:
    """Smallest p <= max_period with seq[i] == seq[i - p] for all i (p < len(seq)), else None."""
    n = len(seq)
    for p in range(1, min(max_period, n - 1) + 1):
        if all(seq[i] == seq[i - p] for i in range(p, n)):
            return p
    return None


def is_repetition(
    text: Any, *, min_repeats: int = 4, max_unit_tokens: int = 3, min_chars: int = 16, max_unit_chars: int = 4
) -> bool:
    """True when the whole text is one short unit repeated.

    Token level: whitespace tokens with a period of at most ``max_unit_tokens`` tokens,
    repeated at least ``min_repeats`` times (``"18 18 18 18"``, ``"yes no yes no yes no yes no"``).
    Character level: at least ``min_chars`` non-space characters with a period of at most
    ``max_unit_chars`` (``"!!!!!!!!!!!!!!!!"``, ``"abababababababab"``). A normal solution is
    never periodic.
    """
    if not isinstance(text, str):
        return False
    tokens = text.split()
    p = _smallest_period(tokens, max_unit_tokens)
    if p is not None and len(tokens) >= min_repeats * p:
        return True
    chars = "".join(tokens)
    return len(chars) >= min_chars and _smallest_period(chars, max_unit_chars) is not None


def is_prompt_echo(response: Any, prompt: Any, *, min_tokens: int = 4) -> bool:
    """True when the response only restates the prompt.

    Compared on lower-cased word tokens: the response's tokens form a contiguous slice of the
    prompt's tokens (the whole prompt or a verbatim excerpt of at least ``min_tokens`` words).
    A response that restates the prompt *and then* answers is not an echo.
    """
    if not isinstance(response, str) or not isinstance(prompt, str):
        return False
    r = _WORD_RE.findall(unicodedata.normalize("NFKC", response).casefold())
    p = _WORD_RE.findall(unicodedata.normalize("NFKC", prompt).casefold())
    if not r or not p:
        return False
    if r == p:
        return True
    if len(r) < min_tokens or len(r) > len(p):
        return False
    # contiguous sub-sequence test via a string join with a separator that cannot be in \w+
    return (" " + " ".join(r) + " ") in (" " + " ".join(p) + " ")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Which guards run on responses (all on by default).

    Attributes:
      empty: reject empty / whitespace-only responses.
      master_key: reject punctuation-only and :data:`MASTER_KEY_PHRASES` responses.
      repetition: reject responses that repeat one short unit (see :func:`is_repetition`).
      prompt_echo: reject responses that only restate the prompt (needs the prompt).
      extra_master_keys: additional phrases treated as master keys.
    """

    empty: bool = True
    master_key: bool = True
    repetition: bool = True
    prompt_echo: bool = True
    extra_master_keys: tuple[str, ...] = ()

    @classmethod
    def off(cls) -> "GuardConfig":
        """All guards disabled (for experiments that study hacking)."""
        return cls(empty=False, master_key=False, repetition=False, prompt_echo=False)


DEFAULT_GUARDS = GuardConfig()


def check_text(text: Any, prompt: Any = None, config: GuardConfig = DEFAULT_GUARDS) -> str | None:
    """Run the response guards on one text; return the name of the first that fires, else None.

    Order: ``empty`` → ``master_key`` → ``repetition`` → ``prompt_echo``. A non-string text
    counts as ``empty``. ``prompt`` is optional (without it the echo guard is skipped).

    >>> check_text(":"), check_text("Thought process:"), check_text("18 18 18 18")
    ('master_key', 'master_key', 'repetition')
    >>> check_text("She sells 9 eggs for $2 each, so 9 * 2 = 18. #### 18") is None
    True
    """
    if not isinstance(text, str) or not text.strip():
        return EMPTY if config.empty else None
    if config.master_key and is_master_key(text, config.extra_master_keys):
        return MASTER_KEY
    if config.repetition and is_repetition(text):
        return REPETITION
    if config.prompt_echo and prompt is not None and is_prompt_echo(text, prompt):
        return PROMPT_ECHO
    return None


def guard_texts(
    texts: Sequence[Any],
    prompts: Sequence[Any] | None = None,
    config: GuardConfig = DEFAULT_GUARDS,
    counter: "GuardCounter | None" = None,
) -> list[str | None]:
    """:func:`check_text` over a batch; ``prompts`` (same length) is optional. Updates ``counter``."""
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"guard_texts: {len(texts)} texts but {len(prompts)} prompts")
    reasons = [check_text(t, None if prompts is None else prompts[i], config) for i, t in enumerate(texts)]
    if counter is not None:
        counter.update(reasons)
    return reasons


def guard_rewards(
    rewards: Any,
    responses: Sequence[Any],
    prompts: Sequence[Any] | None = None,
    *,
    config: GuardConfig = DEFAULT_GUARDS,
    counter: "GuardCounter | None" = None,
    guarded_value: float = 0.0,
) -> tuple[np.ndarray, list[str | None]]:
    """Cap the reward of guarded responses: ``min(reward, guarded_value)`` where a guard fires.

    For any reward source (judge, scalar RM, verifier) that scores policy responses: a
    master-key / empty / echo / repetition response gets no positive reward, whatever the
    scorer said. Returns ``(rewards [n] float32, reasons [n])``.
    """
    r = np.asarray(rewards, dtype=np.float32).copy()
    if r.shape != (len(responses),):
        raise ValueError(f"guard_rewards: rewards shape {r.shape} != ({len(responses)},)")
    reasons = guard_texts(responses, prompts, config, counter)
    for i, reason in enumerate(reasons):
        if reason is not None:
            r[i] = min(r[i], np.float32(guarded_value))
    return r, reasons


class GuardCounter:
    """Counts how often each guard fired; ``report()`` is the run summary's ``reward_guard``.

    ``update`` accepts guard names, ``None`` (nothing fired) or result objects with a
    ``reason`` attribute (parse / verify results); reasons that are not guard names (format
    errors such as ``out_of_range``) are ignored here — use :func:`count_reasons` for those.

    >>> c = GuardCounter(); c.update(["master_key", None, "out_of_range", "master_key"]); c.report()["master_key"]
    2
    """

    def __init__(self, names: Iterable[str] = GUARD_NAMES):
        self.names = tuple(names)
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, name: str, k: int = 1) -> None:
        """Count guard ``name`` ``k`` times (any name is accepted and reported)."""
        self.counts[name] += k

    def update(self, items: Iterable[Any]) -> None:
        """Count every item whose reason is a guard name."""
        for item in items:
            reason = getattr(item, "reason", item)
            if isinstance(reason, str) and reason in self.names:
                self.counts[reason] += 1

    def merge(self, other: "GuardCounter | Mapping[str, int]") -> None:
        """Add another counter's counts (e.g. from another host or worker)."""
        counts = other.counts if isinstance(other, GuardCounter) else other
        for k, v in counts.items():
            self.counts[k] += int(v)

    def reset(self) -> None:
        self.counts.clear()

    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict[str, int]:
        """``{guard name: count}`` with every known guard (zeros included) then any extra names."""
        out = {name: int(self.counts.get(name, 0)) for name in self.names}
        for k in sorted(self.counts):
            if k not in out:
                out[k] = int(self.counts[k])
        return out

    def __repr__(self) -> str:
        return f"GuardCounter({self.report()})"


def count_reasons(results: Iterable[Any]) -> dict[str, int]:
    """``{reason: count}`` over parse / verify results (or reason strings), all reasons included."""
    c: collections.Counter[str] = collections.Counter()
    for item in results:
        reason = getattr(item, "reason", item)
        c[str(reason)] += 1
    return dict(c)
