r"""Rule verifiers: math answers via ``math-verify``, and exact match.

Both verifiers work in three steps per response:

1. **Guards** (:mod:`.guards`, on by default): empty, master-key (``":"``, ``"Thought process:"``…),
   single-unit repetition (``"18 18 18 18"``) and prompt-echo responses get no reward.
2. **Answer extraction** (:func:`extract_answer`) — the answer whose marker comes *last* in the
   text wins. Markers (``answer_formats``):

   ================  =====================================  ======================
   format            example                                extracted
   ================  =====================================  ======================
   ``gsm8k``         ``… so she earns $18.\n#### 18``       ``18``
   ``boxed``         ``… = \boxed{\frac{1}{2}}``            ``\frac{1}{2}``
   ``answer_is``     ``The answer is 18.``                  ``18``
   ``a_colon``       ``A: 18`` (at a line start)            ``18``
   ``answer_colon``  ``Final Answer: 18`` (at a line start)  ``18``
   ================  =====================================  ======================

   A response without any marker is ``no_answer`` (reward 0) unless ``fallback`` says otherwise
   (math: ``"math_verify"`` reads a one-line answer such as ``3\sqrt{3}`` as LaTeX and hands
   any other text to math-verify's own extraction; exact match: ``"whole"`` compares the whole
   response).
3. **Comparison**: :class:`MathVerifier` — ``math_verify.parse`` of gold and answer, each inside
   a math environment (``$3\sqrt{3}$``: outside one math-verify reads only ``3``; prose answers
   such as ``18 eggs`` and ones already in ``$…$`` go in as written, see :func:`_mv_inputs`), then
   ``math_verify.verify(gold, answer)`` (numbers, fractions, radicals, powers, intervals, tuples,
   sets, polynomials, ``x = 5`` ≡ ``5``; thousands separators removed first).
   :class:`ExactMatchVerifier` — equality after :func:`normalize_answer`.

Gold answers may be a final answer (``"18"``) or a full worked solution with a marker (GSM8K's
``"…\n#### 18"``); they go through the same extraction (no marker → the whole gold string).

Output: ``VerifierOutput(rewards [n] float32, results [n] VerifyResult)``.

**Timeouts.** math-verify bounds its own work with ``signal.alarm``, which only works in the
main thread; elsewhere it raises. :class:`MathVerifier` therefore picks a backend:

* ``"inline"`` — in the calling thread. On the main thread math-verify's own SIGALRM timeouts
  are used (``timeout_s`` rounded up to whole seconds; math-verify swaps the SIGALRM handler for
  the duration of each call and cancels any pending alarm, e.g. pytest-timeout's). Off the main
  thread they are disabled (``parsing_timeout=None``, ``timeout_seconds=None``) and nothing
  bounds a pathological input (a warning is logged once).
* ``"process"`` — ``workers`` spawned worker processes. math-verify's timeouts work there
  (each worker runs tasks in its main thread), and the parent enforces a hard per-item deadline
  of ``5 * ceil(timeout_s) + 1`` s (gold and answer, each parsed at most twice, + one
  comparison): a worker past it is killed and replaced, the item is ``timeout``. Safe from any
  thread, no signals in the caller.
* ``"auto"`` (default) — ``inline`` on the main thread, ``process`` elsewhere.

Call :meth:`MathVerifier.close` (or use it as a context manager) to stop worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection as mp_connection
import re
import threading
import time
import unicodedata
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

from jaxrl_rm.rewards import guards as _guards
from jaxrl_rm.rewards.guards import DEFAULT_GUARDS, GuardConfig, GuardCounter
from jaxrl_rm.rewards.parsers import ParseResult

logger = logging.getLogger(__name__)

ANSWER_FORMATS: tuple[str, ...] = ("gsm8k", "boxed", "answer_is", "a_colon", "answer_colon")

# reasons of VerifyResult
CORRECT = "correct"
INCORRECT = "incorrect"
NO_ANSWER = _guards.NO_ANSWER
NO_GOLD = "no_gold"
TIMEOUT = "timeout"
ERROR = "error"

# ============================================================================ extraction

_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_A_COLON_RE = re.compile(r"(?m)^[ \t]*A:[ \t]*([^\n]*)")
_ANSWER_COLON_RE = re.compile(
    r"(?im)^[ \t]*(?:\*\*|#+[ \t]*)?(?:the[ \t]+)?(?:final[ \t]+)?answer(?:\*\*)?[ \t]*[:：](?:\*\*)?[ \t]*([^\n]*)"
)
_ANSWER_IS_RE = re.compile(r"(?i)\b(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]+is[ \t]*[:：]?[ \t]*([^\n]*)")
_BOX_START_RE = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_SENTENCE_END_RE = re.compile(r"\.(?=[\s'\"\u2019\u201d)]|$)")


def _boxed_candidates(text: str) -> list[tuple[int, str]]:
    out = []
    for m in _BOX_START_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end() : i - 1]))
    return out


def _first_sentence(s: str) -> str:
    m = _SENTENCE_END_RE.search(s)
    return s[: m.start()] if m else s


def _candidates(text: str, fmt: str) -> list[tuple[int, str]]:
    if fmt == "gsm8k":
        return [(m.start(), m.group(1)) for m in _GSM8K_RE.finditer(text)]
    if fmt == "boxed":
        return _boxed_candidates(text)
    if fmt == "answer_is":
        return [(m.start(), _first_sentence(m.group(1))) for m in _ANSWER_IS_RE.finditer(text)]
    if fmt == "a_colon":
        return [(m.start(), m.group(1)) for m in _A_COLON_RE.finditer(text)]
    if fmt == "answer_colon":
        return [(m.start(), m.group(1)) for m in _ANSWER_COLON_RE.finditer(text)]
    raise ValueError(f"unknown answer format {fmt!r}; valid: {list(ANSWER_FORMATS)}")


_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_LATEX_THOUSANDS_RE = re.compile(r"(?<=\d)\{,\}(?=\d{3})")


def clean_answer(answer: str) -> str:
    r"""Light clean-up of an extracted answer before comparison.

    Strips whitespace, markdown bold, a trailing period; ``\$`` → ``$``; drops thousands
    separators (``1,450,000`` → ``1450000``, ``1{,}000`` → ``1000``).
    """
    a = answer.strip().replace("**", "").strip()
    a = a.replace("\\$", "$")
    a = _LATEX_THOUSANDS_RE.sub("", a)
    a = _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), a)
    a = a.rstrip()
    while a.endswith("."):
        a = a[:-1].rstrip()
    return a


def _extract(text: str, formats: Sequence[str]) -> tuple[str, str, int] | None:
    best: tuple[int, str, str] | None = None
    for fmt in formats:
        for pos, raw in _candidates(text, fmt):
            ans = clean_answer(raw)
            if ans and (best is None or pos >= best[0]):
                best = (pos, fmt, ans)
    return None if best is None else (best[2], best[1], best[0])


def _check_formats(formats: Sequence[str]) -> None:
    for f in formats:
        if f not in ANSWER_FORMATS:
            raise ValueError(f"unknown answer format {f!r}; valid: {list(ANSWER_FORMATS)}")


def extract_answer(text: Any, formats: Sequence[str] = ANSWER_FORMATS) -> ParseResult[str]:
    r"""Final answer of a response: the last-starting marker of ``formats`` wins. Never raises.

    ``value`` is the cleaned answer string (:func:`clean_answer`); ``reason`` is ``"ok"``,
    ``"no_answer"``, ``"empty"`` or ``"not_text"``; ``span[0]`` is where the marker starts.

    >>> extract_answer("Janet sells 9 eggs.\n#### 18").value
    '18'
    >>> extract_answer(r"So $x = \boxed{\frac{1}{2}}$.").value
    '\\frac{1}{2}'
    >>> extract_answer("The answer is 1,250.").value
    '1250'
    >>> extract_answer("I think it's 18").reason
    'no_answer'
    """
    _check_formats(formats)
    if not isinstance(text, str):
        return ParseResult.invalid("not_text")
    if not text.strip():
        return ParseResult.invalid(_guards.EMPTY)
    try:
        found = _extract(text, formats)
    except Exception:  # noqa: BLE001 - never raise on model output
        return ParseResult.invalid("parser_error")
    if found is None:
        return ParseResult.invalid(NO_ANSWER)
    ans, _fmt, pos = found
    return ParseResult(True, ans, "ok", None, (pos, pos))


def gsm8k_answer(answer_field: str) -> str | None:
    """Gold final answer of a GSM8K ``answer`` field (text after the last ``####``), cleaned."""
    found = _extract(answer_field, ("gsm8k",)) if isinstance(answer_field, str) else None
    return None if found is None else found[0]


def _gold_answers(gold: Any, formats: Sequence[str]) -> tuple[str, ...]:
    """Gold answer strings: marker-extracted when the gold is a worked solution, else as given."""
    items = gold if isinstance(gold, (list, tuple)) else [gold]
    out = []
    for g in items:
        if g is None:
            continue
        if not isinstance(g, str):
            g = repr(g) if isinstance(g, float) else str(g)
        found = _extract(g, formats)
        ans = found[0] if found is not None else clean_answer(g)
        if ans:
            out.append(ans)
    return tuple(out)


_NORM_PUNCT = " \t\r\n.,;:!?\"'`*()[]"
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
    r"""Exact-match normalisation: NFKC, casefold, ``\text{x}`` → ``x``, no ``$``, no thousands
    separators, collapsed whitespace, surrounding punctuation/quotes stripped.

    >>> normalize_answer("  **Paris.** "), normalize_answer(r"$\text{1,000}$")
    ('paris', '1000')
    """
    s = unicodedata.normalize("NFKC", s)
    s = _TEXT_CMD_RE.sub(r"\1", s).replace("\\$", "").replace("$", "")
    s = clean_answer(s).casefold()
    s = " ".join(s.split())
    return s.strip(_NORM_PUNCT)


# ============================================================================ results


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Verdict on one response.

    Attributes:
      valid: an answer was found, passed the guards and was compared (no timeout / error).
      value: True when the answer is correct.
      reason: ``correct`` | ``incorrect`` | ``no_answer`` | a guard name (``empty``,
        ``master_key``, ``repetition``, ``prompt_echo``) | ``timeout`` | ``error`` | ``no_gold``.
      answer: the extracted answer (None if none).
      gold: the gold answer(s) compared against.
    """

    valid: bool
    value: bool
    reason: str
    answer: str | None = None
    gold: tuple[str, ...] = ()


class VerifierOutput(NamedTuple):
    rewards: np.ndarray  # [n] float32
    results: list[VerifyResult]


# ============================================================================ math-verify calls


def _mv_timeout(timeout_s: float | None) -> int | None:
    return None if timeout_s is None or timeout_s <= 0 else max(1, math.ceil(timeout_s))


@functools.lru_cache(maxsize=65536)
def _mv_parse(text: str, timeout: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse(text, parsing_timeout=timeout))  # type: ignore[arg-type]


# A math environment already present: $…$ (balanced), \(…\), \[…\].
_MATH_DELIMITED_RE = re.compile(r"\$[^$]+\$|\\\(|\\\[")
# LaTeX commands whose argument is words, not math (dropped before looking for prose words).
_LATEX_TEXT_ARG_RE = re.compile(
    r"\\(?:text[a-z]*|math(?:rm|bf|it|sf|tt|bb|cal|frak)|mbox|hbox|operatorname|begin|end)\s*\{[^{}]*\}"
)
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
# A whitespace-separated word (punctuation around it allowed) of >= 3 letters or a short English
# one: "18 eggs", "3/4 of a cup"; not variables such as "ab + bc" or "2 xy".
_PROSE_WORD_RE = re.compile(
    r"(?:^|(?<=\s))[(\"']*(?:[A-Za-z]{3,}|(?i:is|of|to|in|on|at|an|or|by|it|he|we|so|as|be|if|my|no))"
    r"[)\"'.,;:!?]*(?=\s|$)"
)


def _is_prose(answer: str) -> bool:
    r"""True when an answer reads as words around a number (``18 eggs``, ``She has 18 left``)
    rather than one expression (``3\sqrt{3}``, ``10 \text{ cm}``, ``2 xy``, ``\text{(C)}``)."""
    bare = _LATEX_COMMAND_RE.sub(" ", _LATEX_TEXT_ARG_RE.sub(" ", answer))
    return _PROSE_WORD_RE.search(bare) is not None


def _mv_inputs(answer: str, fmt: str | None) -> tuple[str, ...]:
    r"""Texts for ``math_verify.parse``, in order: the first that parses to something is used.

    math-verify reads LaTeX only inside a math environment; outside one it extracts a plain
    expression and stops at the first LaTeX it cannot read (``2^{10}`` → ``2``, ``3\sqrt{3}`` →
    ``3``, ``\sqrt{2}`` → nothing). So an answer goes in as ``$answer$``, with the raw text as the
    fallback; an answer that is prose (:func:`_is_prose`: ``$18 eggs$`` would be the product
    ``18·e·g·g·s``) goes in raw first, ``$answer$`` second. An answer that already holds a math
    environment (``$\frac{1}{2}$``) goes in as it is; a lone ``$`` is a currency sign and dropped
    (boxed contents are in math mode: every ``$`` there is dropped).
    ``fmt``: the answer format that found the answer, ``""`` for a bare final answer (a gold);
    ``None``: the answer is a whole response without a marker (fallback): one line that is not
    prose is a bare final answer (``3\sqrt{3}``), anything else goes to math-verify's own
    extraction as it is.

    >>> _mv_inputs(r"3\sqrt{3}", "boxed"), _mv_inputs("$18 per day", "answer_is")
    (('$3\\sqrt{3}$', '3\\sqrt{3}'), ('18 per day', '$18 per day$'))
    """
    a = answer.strip()
    if fmt is None and ("\n" in a or _is_prose(a)):
        return (a,)
    if fmt != "boxed" and _MATH_DELIMITED_RE.search(a):
        return (a,)
    a = a.replace("$", "").strip()
    if not a:
        return ()
    wrapped = f"${a}$"
    return (a, wrapped) if _is_prose(a) else (wrapped, a)


def _mv_parse_first(texts: Sequence[str], timeout: int | None) -> tuple:
    """``math_verify.parse`` of the first of ``texts`` that parses to something (``()`` if none)."""
    for text in texts:
        parsed = _mv_parse(text, timeout)
        if parsed:
            return parsed
    return ()


def math_equal(golds: tuple[str, ...], answer: str, answer_fmt: str | None, timeout: int | None) -> tuple[str, str | None]:
    """One math-verify comparison; ``(reason, extracted)`` with reason ``correct``/``incorrect``/``no_answer``/``no_gold``.

    Gold and answer are parsed as :func:`_mv_inputs` says (golds as final answers, format
    unknown). ``answer_fmt=None`` means the answer is a whole response (fallback). ``timeout``
    is math-verify's own (signal) timeout in seconds, or None to disable it.
    Runs in the caller's process; module-level so worker processes can run it.
    """
    from math_verify import verify

    gold_parsed: list = []
    for g in golds:
        gold_parsed.extend(_mv_parse_first(_mv_inputs(g, ""), timeout))  # "": a bare final answer
    if not gold_parsed:
        return NO_GOLD, None
    pred = list(_mv_parse_first(_mv_inputs(answer, answer_fmt), timeout))
    if not pred:
        return NO_ANSWER, None
    extracted = str(pred[-1]) if answer_fmt is None else answer
    ok = verify(gold_parsed, pred, timeout_seconds=timeout)
    return (CORRECT if ok else INCORRECT), extracted


# ============================================================================ worker processes


def _worker_main(conn: Any, fn: Callable[..., Any]) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, args = msg
        try:
            out = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            out = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send((idx, *out))
        except (EOFError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, fn: Callable[..., Any]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True, name="jaxrl_rm-verifier")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, EOFError):
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        try:
            self.conn.close()
        except OSError:
            pass


class ProcessPool:
    """A small pool of worker processes with a hard per-item deadline.

    ``run(tasks, deadline_s)`` calls ``fn(*task)`` for each task in a worker and returns
    ``[(status, value)]`` in order, status ``ok`` | ``error`` | ``timeout``. A worker that holds
    one item longer than ``deadline_s`` is killed and replaced (SIGKILL: works even when the item
    is stuck in C code). ``fn`` and the tasks must be picklable; workers use the ``spawn`` start
    method by default (fork is unsafe once JAX has started its threads). Thread-safe.
    """

    def __init__(self, fn: Callable[..., Any], workers: int = 2, mp_context: str = "spawn"):
        if workers < 1:
            raise ValueError(f"ProcessPool needs workers >= 1, got {workers}")
        self.fn = fn
        self.n_workers = workers
        self._ctx = multiprocessing.get_context(mp_context)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0
        self._deaths_in_a_row = 0  # workers lost without any reply in between

    def _ensure(self) -> None:
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self._ctx, self.fn))

    def _replace(self, w: int) -> None:
        self._workers[w].kill()
        self._workers[w] = _Worker(self._ctx, self.fn)
        self.restarts += 1

    def run(self, tasks: Sequence[tuple], deadline_s: float) -> list[tuple[str, Any]]:
        with self._lock:
            self._ensure()
            results: list[tuple[str, Any] | None] = [None] * len(tasks)
            pending = collections.deque(range(len(tasks)))
            busy: dict[int, tuple[int, float]] = {}
            while pending or busy:
                if self._deaths_in_a_row > 2 * self.n_workers + 2:
                    # workers die on start-up (e.g. a script without `if __name__ == "__main__":`
                    # under the spawn start method): give up instead of churning processes
                    logger.error("ProcessPool: worker processes keep dying at start-up; giving up on %d items "
                                 "(scripts using spawn need an `if __name__ == '__main__':` guard)", len(pending) + len(busy))
                    for ti in list(pending) + [ti for ti, _ in busy.values()]:
                        results[ti] = (ERROR, "worker processes keep dying")
                    for w in list(busy):
                        self._replace(w)
                    self._deaths_in_a_row = 0
                    break
                for w in range(len(self._workers)):
                    if w in busy or not pending:
                        continue
                    ti = pending.popleft()
                    try:
                        self._workers[w].conn.send((ti, tasks[ti]))
                        busy[w] = (ti, time.monotonic())
                    except (OSError, EOFError):  # worker died while idle
                        pending.appendleft(ti)
                        self._deaths_in_a_row += 1
                        self._replace(w)
                if not busy:
                    continue
                now = time.monotonic()
                wait_s = max(0.0, min(t0 + deadline_s - now for _, t0 in busy.values()))
                conns = {self._workers[w].conn: w for w in busy}
                for conn in mp_connection.wait(list(conns), timeout=wait_s):
                    w = conns[conn]
                    ti, _ = busy.pop(w)
                    try:
                        got, status, value = conn.recv()
                        results[ti] = (status, value) if got == ti else (ERROR, "out-of-order reply")
                        self._deaths_in_a_row = 0
                    except (EOFError, OSError):
                        results[ti] = (ERROR, "worker died")
                        self._deaths_in_a_row += 1
                        self._replace(w)
                now = time.monotonic()
                for w, (ti, t0) in list(busy.items()):
                    if now - t0 >= deadline_s:
                        results[ti] = (TIMEOUT, None)
                        del busy[w]
                        self._replace(w)
            return [r if r is not None else (ERROR, "lost") for r in results]

    def close(self) -> None:
        with self._lock:
            for wk in self._workers:
                wk.stop()
            self._workers = []

    def __del__(self) -> None:  # best effort; daemon workers also die with the parent
        try:
            for wk in self._workers:
                wk.kill()
        except Exception:  # noqa: BLE001
            pass


# ============================================================================ verifiers

Backend = Literal["auto", "inline", "process"]
_warned_no_timeout = False


class _VerifierBase:
    def __init__(
        self,
        answer_formats: Sequence[str],
        guards: GuardConfig,
        correct_reward: float,
        incorrect_reward: float,
        invalid_reward: float,
        counter: GuardCounter | None,
    ):
        _check_formats(answer_formats)
        self.answer_formats = tuple(answer_formats)
        self.guards = guards
        self.correct_reward = float(correct_reward)
        self.incorrect_reward = float(incorrect_reward)
        self.invalid_reward = float(invalid_reward)
        self.counter = counter if counter is not None else GuardCounter()

    def guard_report(self) -> dict[str, int]:
        """``{guard name: count}`` over every call so far (for the run summary's ``reward_guard``)."""
        return self.counter.report()

    def _prepare(self, responses: Sequence[Any], golds: Sequence[Any], prompts: Sequence[Any] | None):
        if len(golds) != len(responses):
            raise ValueError(f"{type(self).__name__}: {len(responses)} responses but {len(golds)} golds")
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"{type(self).__name__}: {len(responses)} responses but {len(prompts)} prompts")
        guard_reasons = _guards.guard_texts(responses, prompts, self.guards)
        return guard_reasons

    def _reward(self, r: VerifyResult) -> float:
        if not r.valid:
            return self.invalid_reward
        return self.correct_reward if r.value else self.incorrect_reward

    def _finish(self, results: list[VerifyResult]) -> VerifierOutput:
        self.counter.update(results)
        rewards = np.asarray([self._reward(r) for r in results], dtype=np.float32).reshape(len(results))
        return VerifierOutput(rewards, results)


class MathVerifier(_VerifierBase):
    """Rule verifier for math answers (RLVR), backed by ``math-verify``.

    Args:
      answer_formats: answer markers to look for (see module docstring).
      fallback: ``"none"`` — a response without a marker is ``no_answer``; ``"math_verify"`` —
        a one-line response that is not prose is a bare final answer (read as LaTeX), any other
        goes to math-verify's own extraction (lenient: "last number" wins).
      timeout_s: time budget per math-verify call (see "Timeouts" in the module docstring).
      backend: ``"auto"`` | ``"inline"`` | ``"process"``.
      workers: worker processes for the ``process`` backend.
      guards: which response guards run (:class:`~jaxrl_rm.rewards.guards.GuardConfig`).
      correct_reward, incorrect_reward, invalid_reward: reward values (invalid = no answer,
        guarded, timeout or error).
      counter: a shared :class:`GuardCounter` (one is created otherwise; see :meth:`guard_report`).

    ``verifier(responses, golds, prompts=None) -> VerifierOutput(rewards [n] f32, results [n])``.

    >>> v = MathVerifier(backend="inline")
    >>> v(["2 + 2 = 4\\n#### 4", "#### 5", ":"], ["4", "4", "4"]).rewards.tolist()
    [1.0, 0.0, 0.0]
    """

    def __init__(
        self,
        *,
        answer_formats: Sequence[str] = ANSWER_FORMATS,
        fallback: Literal["none", "math_verify"] = "none",
        timeout_s: float = 5.0,
        backend: Backend = "auto",
        workers: int = 2,
        mp_context: str = "spawn",
        guards: GuardConfig = DEFAULT_GUARDS,
        correct_reward: float = 1.0,
        incorrect_reward: float = 0.0,
        invalid_reward: float = 0.0,
        counter: GuardCounter | None = None,
    ):
        super().__init__(answer_formats, guards, correct_reward, incorrect_reward, invalid_reward, counter)
        if fallback not in ("none", "math_verify"):
            raise ValueError(f"MathVerifier fallback must be 'none' or 'math_verify', got {fallback!r}")
        if backend not in ("auto", "inline", "process"):
            raise ValueError(f"MathVerifier backend must be 'auto', 'inline' or 'process', got {backend!r}")
        self.fallback = fallback
        self.timeout_s = timeout_s
        self.backend = backend
        self.workers = workers
        self.mp_context = mp_context
        self._pool: ProcessPool | None = None

    # -- backend
    def resolve_backend(self) -> str:
        """The backend a call from the current thread would use."""
        if self.backend != "auto":
            return self.backend
        return "inline" if threading.current_thread() is threading.main_thread() else "process"

    def _run_inline(self, tasks: list[tuple]) -> list[tuple[str, Any]]:
        global _warned_no_timeout
        on_main = threading.current_thread() is threading.main_thread()
        timeout = _mv_timeout(self.timeout_s) if on_main else None
        if not on_main and self.timeout_s and not _warned_no_timeout:
            logger.warning("MathVerifier: inline backend off the main thread runs math-verify without timeouts; "
                           "use backend='process' for hard timeouts")
            _warned_no_timeout = True
        out = []
        for golds, ans, fmt, _ in tasks:
            try:
                out.append(("ok", math_equal(golds, ans, fmt, timeout)))
            except BaseException as e:  # noqa: BLE001 - includes math-verify's TimeoutException
                if isinstance(e, KeyboardInterrupt):
                    raise
                out.append((ERROR, f"{type(e).__name__}: {e}"))
        return out

    def _run_process(self, tasks: list[tuple]) -> list[tuple[str, Any]]:
        if self._pool is None:
            self._pool = ProcessPool(math_equal, self.workers, self.mp_context)
        t = _mv_timeout(self.timeout_s)
        deadline = 5 * t + 1.0 if t else float("inf")
        return self._pool.run(tasks, deadline)

    # -- call
    def __call__(self, responses: Sequence[Any], golds: Sequence[Any], prompts: Sequence[Any] | None = None) -> VerifierOutput:
        guard_reasons = self._prepare(responses, golds, prompts)
        results: list[VerifyResult | None] = [None] * len(responses)
        tasks: list[tuple] = []
        where: list[int] = []
        for i, resp in enumerate(responses):
            gold = _gold_answers(golds[i], self.answer_formats)
            if guard_reasons[i] is not None:
                results[i] = VerifyResult(False, False, guard_reasons[i], None, gold)
                continue
            if not gold:
                results[i] = VerifyResult(False, False, NO_GOLD, None, gold)
                continue
            found = _extract(resp, self.answer_formats)
            if found is None:
                if self.fallback == "none":
                    results[i] = VerifyResult(False, False, NO_ANSWER, None, gold)
                    continue
                tasks.append((gold, resp, None, _mv_timeout(self.timeout_s)))
            else:
                tasks.append((gold, found[0], found[1], _mv_timeout(self.timeout_s)))
            where.append(i)
        if tasks:
            backend = self.resolve_backend()
            outs = self._run_inline(tasks) if backend == "inline" else self._run_process(tasks)
            for i, task, (status, value) in zip(where, tasks, outs):
                gold = task[0]
                if status == "ok":
                    reason, extracted = value
                    ok = reason == CORRECT
                    valid = reason in (CORRECT, INCORRECT)
                    results[i] = VerifyResult(valid, ok, reason, extracted, gold)
                else:
                    results[i] = VerifyResult(False, False, TIMEOUT if status == TIMEOUT else ERROR, None, gold)
        return self._finish([r for r in results if r is not None])

    def close(self) -> None:
        """Stop worker processes (if any). The verifier stays usable (they restart on demand)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class ExactMatchVerifier(_VerifierBase):
    """Exact-match verifier: extracted answer == gold after ``normalize`` (default :func:`normalize_answer`).

    Args:
      fallback: ``"whole"`` (default) — without an answer marker the whole response is the
        answer; ``"none"`` — no marker → ``no_answer``.
      normalize: string normaliser applied to both sides (``None`` → compare stripped text).
      Others as :class:`MathVerifier`. A gold may be a list of acceptable answers.

    >>> ExactMatchVerifier()(["Paris.", "The answer is paris", ""], ["Paris"] * 3).rewards.tolist()
    [1.0, 1.0, 0.0]
    """

    def __init__(
        self,
        *,
        answer_formats: Sequence[str] = ANSWER_FORMATS,
        fallback: Literal["none", "whole"] = "whole",
        normalize: Callable[[str], str] | None = normalize_answer,
        guards: GuardConfig = DEFAULT_GUARDS,
        correct_reward: float = 1.0,
        incorrect_reward: float = 0.0,
        invalid_reward: float = 0.0,
        counter: GuardCounter | None = None,
    ):
        super().__init__(answer_formats, guards, correct_reward, incorrect_reward, invalid_reward, counter)
        if fallback not in ("none", "whole"):
            raise ValueError(f"ExactMatchVerifier fallback must be 'none' or 'whole', got {fallback!r}")
        self.fallback = fallback
        self.normalize = normalize if normalize is not None else (lambda s: s.strip())

    def __call__(self, responses: Sequence[Any], golds: Sequence[Any], prompts: Sequence[Any] | None = None) -> VerifierOutput:
        guard_reasons = self._prepare(responses, golds, prompts)
        results = []
        for i, resp in enumerate(responses):
            gold = _gold_answers(golds[i], self.answer_formats)
            if guard_reasons[i] is not None:
                results.append(VerifyResult(False, False, guard_reasons[i], None, gold))
                continue
            if not gold:
                results.append(VerifyResult(False, False, NO_GOLD, None, gold))
                continue
            found = _extract(resp, self.answer_formats)
            if found is None and self.fallback == "none":
                results.append(VerifyResult(False, False, NO_ANSWER, None, gold))
                continue
            ans = found[0] if found is not None else clean_answer(resp)
            try:
                a = self.normalize(ans)
                ok = bool(a) and any(a == self.normalize(g) for g in gold)
            except Exception as e:  # noqa: BLE001 - a user normaliser failing is an error result, not a crash
                results.append(VerifyResult(False, False, ERROR, ans, gold))
                logger.debug("normalize failed: %s", e)
                continue
            results.append(VerifyResult(True, ok, CORRECT if ok else INCORRECT, ans, gold))
        return self._finish(results)


def verify_math(responses: Sequence[Any], golds: Sequence[Any], prompts: Sequence[Any] | None = None, **options: Any) -> VerifierOutput:
    """One-shot :class:`MathVerifier` call (worker processes, if used, are stopped afterwards)."""
    with MathVerifier(**options) as v:
        return v(responses, golds, prompts)


def exact_match(responses: Sequence[Any], golds: Sequence[Any], prompts: Sequence[Any] | None = None, **options: Any) -> VerifierOutput:
    """One-shot :class:`ExactMatchVerifier` call."""
    return ExactMatchVerifier(**options)(responses, golds, prompts)


class PathVerifier(_VerifierBase):
    """The miniature path task's checker (``synthetic:paths``): a response is right when it breaks
    none of the constraints its prompt states (:func:`jaxrl_rm.data.synthetic.path_violations`:
    start, end, length, every adjacent pair a listed edge). Any valid walk is right, not only the
    planted gold one, so golds are ignored; a prompt without a path problem is ``no_gold``.

    The whole response (stripped) is the answer. Only the empty-response guard runs by default: a
    valid walk may repeat a unit (``abab``) and no other answer can pass the check.

    >>> p = "path:a>c,3:a:b b:c c:a="
    >>> PathVerifier()(["abc", "acc", " abc\\n"], [""] * 3, prompts=[p] * 3).rewards.tolist()
    [1.0, 0.0, 1.0]
    """

    def __init__(self, *, guards: GuardConfig = GuardConfig(master_key=False, repetition=False, prompt_echo=False),
                 correct_reward: float = 1.0, incorrect_reward: float = 0.0, invalid_reward: float = 0.0,
                 counter: GuardCounter | None = None):
        super().__init__(ANSWER_FORMATS, guards, correct_reward, incorrect_reward, invalid_reward, counter)

    def __call__(self, responses: Sequence[Any], golds: Sequence[Any], prompts: Sequence[Any] | None = None) -> VerifierOutput:
        from jaxrl_rm.data.synthetic import path_violations

        if prompts is None:
            raise ValueError("PathVerifier: needs the prompts (the constraints are stated there)")
        guard_reasons = self._prepare(responses, golds, prompts)
        results = []
        for resp, prompt, reason in zip(responses, prompts, guard_reasons):
            ans = str(resp).strip()
            broken = path_violations(prompt if isinstance(prompt, str) else "", ans)
            if reason is not None:
                results.append(VerifyResult(False, False, reason, None))
            elif broken is None:
                results.append(VerifyResult(False, False, NO_GOLD, ans))
            else:
                results.append(VerifyResult(True, not broken, INCORRECT if broken else CORRECT, ans))
        return self._finish(results)


#: Rule verifiers by the name configs use (a reward `type`, `judge.teacher`, `eval_verifier`).
VERIFIERS: dict[str, type[_VerifierBase]] = {"verifier": MathVerifier, "exact_match": ExactMatchVerifier,
                                              "path_check": PathVerifier}


def make_verifier(kind: str, **options: Any) -> _VerifierBase:
    """The rule verifier `kind` (a key of :data:`VERIFIERS`) built with `options`."""
    if kind not in VERIFIERS:
        raise ValueError(f"unknown verifier {kind!r}; available: {sorted(VERIFIERS)}")
    return VERIFIERS[kind](**options)
