"""Record types shared by every pipeline, with validating `from_dict` and `to_dict`.

A prompt is either a non-empty string or a chat message list: a non-empty sequence of
`{"role": "system"|"user"|"assistant", "content": str}` dicts (extra keys are kept). Records are
frozen dataclasses; message lists are stored as a tuple of dicts and `to_dict()` gives lists back,
so `Record.from_dict(r.to_dict(), ...) == r`.

`from_dict(row, *, file, line)` validates types and raises `BadRowError` naming the field
(`prompt[1].role`, `responses[3]`, ...). Unknown keys of `row` are ignored. Required strings must
be non-empty (whitespace-only counts as empty); message contents may be empty strings. Ids are a
string or an int. Direct construction does not validate: loaders build records through
`from_dict` or from already validated values.

| record | used by |
|---|---|
| `SFTRecord(prompt, response)` | SFT |
| `PreferencePair(prompt, chosen, rejected)` | Bradley–Terry RM training / eval |
| `PolarQuad(prompt, a1, a2, b1)` | POLAR pretraining: A1, A2 from one policy, B1 from another |
| `RankedTriple(prompt, reference, chosen, rejected)` | POLAR fine-tuning: reference ≻ chosen ≻ rejected |
| `RankingItem(prompt, responses, gold_scores)` | N-way rankings (URPO) |
| `VerifiableProblem(prompt, answer)` | RLVR with a gold answer string |
| `JudgmentExample(prompt, response, label)` | judge training / eval |
| `PromptItem(task, prompt, answer, reference, ...)` | one RL prompt and what its rewards need |
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Union

from jaxrl_rm.data.errors import ROW_FIELD, BadRowError, describe_value

Message = dict[str, Any]
Prompt = Union[str, tuple[Message, ...]]
RecordId = Union[str, int, None]

ROLES: tuple[str, ...] = ("system", "user", "assistant")

_MISSING = object()


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


class RowValidator:
    """Reads typed fields out of one row, raising `BadRowError` with file, line and field."""

    def __init__(self, row: Any, *, file: str, line: int):
        self.file = str(file)
        self.line = int(line)
        if not isinstance(row, Mapping):
            raise self.error(
                ROW_FIELD, "not_object", f"expected a JSON object, got {describe_value(row)}"
            )
        self.row = row

    def error(self, field: str | None, kind: str, message: str) -> BadRowError:
        return BadRowError(self.file, self.line, field, message, kind)

    def _get(self, key: str, required: bool) -> Any:
        value = self.row.get(key, _MISSING)
        if value is None and not required:
            return _MISSING
        if value is _MISSING and required:
            raise self.error(key, "missing", "required field is missing")
        return value

    # -- scalars ------------------------------------------------------------------------------
    def check_str(self, value: Any, field: str, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            want = "a string" if allow_empty else "a non-empty string"
            raise self.error(field, "wrong_type", f"expected {want}, got {describe_value(value)}")
        if not allow_empty and not value.strip():
            raise self.error(
                field, "empty_string", f"expected a non-empty string, got {describe_value(value)}"
            )
        return value

    def req_str(self, key: str, *, allow_empty: bool = False) -> str:
        return self.check_str(self._get(key, True), key, allow_empty=allow_empty)

    def opt_str(self, key: str) -> str | None:
        value = self._get(key, False)
        return None if value is _MISSING else self.check_str(value, key)

    def check_number(self, value: Any, field: str, *, allow_bool: bool = False) -> float | int | bool:
        if isinstance(value, bool):
            if allow_bool:
                return value
            raise self.error(field, "wrong_type", f"expected a number, got {describe_value(value)}")
        if not isinstance(value, (int, float)):
            want = "a number or a bool" if allow_bool else "a number"
            raise self.error(field, "wrong_type", f"expected {want}, got {describe_value(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(field, "not_finite", f"expected a finite number, got {value!r}")
        return value

    def number(self, key: str, *, allow_bool: bool = False) -> float | int | bool:
        return self.check_number(self._get(key, True), key, allow_bool=allow_bool)

    def opt_id(self, key: str = "id") -> RecordId:
        value = self._get(key, False)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(
                key, "wrong_type", f"expected a string or an int id, got {describe_value(value)}"
            )
        if isinstance(value, str) and not value.strip():
            raise self.error(key, "empty_string", f"expected a non-empty id, got {value!r}")
        return value

    # -- sequences ----------------------------------------------------------------------------
    def _sequence(self, key: str, min_len: int) -> Sequence[Any]:
        value = self._get(key, True)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise self.error(key, "wrong_type", f"expected a list, got {describe_value(value)}")
        if len(value) < min_len:
            raise self.error(
                key, "too_short", f"expected a list of at least {min_len} items, got {len(value)}"
            )
        return value

    def str_tuple(self, key: str, *, min_len: int = 1) -> tuple[str, ...]:
        value = self._sequence(key, min_len)
        return tuple(self.check_str(v, f"{key}[{i}]") for i, v in enumerate(value))

    def number_tuple(self, key: str, *, min_len: int = 1) -> tuple[float | int, ...]:
        value = self._sequence(key, min_len)
        return tuple(self.check_number(v, f"{key}[{i}]") for i, v in enumerate(value))

    # -- prompts ------------------------------------------------------------------------------
    def check_messages(self, value: Any, field: str) -> tuple[Message, ...]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise self.error(
                field, "wrong_type", f"expected a message list, got {describe_value(value)}"
            )
        if not value:
            raise self.error(field, "empty_list", "expected a non-empty message list, got []")
        out = []
        for i, msg in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(msg, Mapping):
                raise self.error(
                    where, "bad_message",
                    f"expected a message dict with 'role' and 'content', got {describe_value(msg)}",
                )
            if "role" not in msg:
                raise self.error(f"{where}.role", "missing", "message has no 'role'")
            if msg["role"] not in ROLES:
                raise self.error(
                    f"{where}.role", "bad_role",
                    f"expected one of {list(ROLES)}, got {describe_value(msg['role'])}",
                )
            if "content" not in msg:
                raise self.error(f"{where}.content", "missing", "message has no 'content'")
            if not isinstance(msg["content"], str):
                raise self.error(
                    f"{where}.content", "wrong_type",
                    f"expected a string, got {describe_value(msg['content'])}",
                )
            out.append(dict(msg))
        return tuple(out)

    def check_prompt(self, value: Any, field: str) -> Prompt:
        if isinstance(value, str):
            return self.check_str(value, field)
        if isinstance(value, (Sequence,)) and not isinstance(value, (bytes, Mapping)):
            return self.check_messages(value, field)
        raise self.error(
            field, "wrong_type",
            f"expected a non-empty string or a message list, got {describe_value(value)}",
        )

    def prompt(self, key: str = "prompt") -> Prompt:
        return self.check_prompt(self._get(key, True), key)


def validate_messages(
    value: Any, *, field: str = "prompt", file: str = "<messages>", line: int = 0
) -> tuple[Message, ...]:
    """Validate a chat message list (see module docstring); returns a tuple of dict copies."""
    return RowValidator({}, file=file, line=line).check_messages(value, field)


def is_chat(prompt: Prompt) -> bool:
    """True if `prompt` is a message list rather than a plain string."""
    return not isinstance(prompt, str)


def _norm_prompt(prompt: Any) -> Any:
    """Message lists become a tuple of dict copies; strings are unchanged."""
    if isinstance(prompt, str) or prompt is None:
        return prompt
    if isinstance(prompt, Sequence):
        return tuple(dict(m) if isinstance(m, Mapping) else m for m in prompt)
    return prompt


def _prompt_out(prompt: Prompt) -> str | list[Message]:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class _Record:
    """Shared behaviour: normalise prompts to tuples on construction; `to_dict`."""

    _sequence_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _norm_prompt(self.prompt))
        for name in self._sequence_fields:
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: message lists and tuples as lists; None fields included."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "prompt":
                value = _prompt_out(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class SFTRecord(_Record):
    """A prompt and a target response (SFT)."""

    prompt: Prompt
    response: str
    id: RecordId = None

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> SFTRecord:
        v = RowValidator(row, file=file, line=line)
        return cls(prompt=v.prompt(), response=v.req_str("response"), id=v.opt_id())


@dataclasses.dataclass(frozen=True)
class PreferencePair(_Record):
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response (BT)."""

    prompt: Prompt
    chosen: str
    rejected: str
    subset: str | None = None
    id: RecordId = None

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> PreferencePair:
        v = RowValidator(row, file=file, line=line)
        return cls(
            prompt=v.prompt(), chosen=v.req_str("chosen"), rejected=v.req_str("rejected"),
            subset=v.opt_str("subset"), id=v.opt_id(),
        )


@dataclasses.dataclass(frozen=True)
class PolarQuad(_Record):
    """POLAR pretraining item: `a1`, `a2` sampled from one policy, `b1` from another.

    Loss `-log σ(r(p, a1, a2) - r(p, a1, b1))`: the RM learns that a2 is closer to a1 than b1 is.
    """

    prompt: Prompt
    a1: str
    a2: str
    b1: str
    policy_a: str | None = None
    policy_b: str | None = None
    id: RecordId = None

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> PolarQuad:
        v = RowValidator(row, file=file, line=line)
        return cls(
            prompt=v.prompt(), a1=v.req_str("a1"), a2=v.req_str("a2"), b1=v.req_str("b1"),
            policy_a=v.opt_str("policy_a"), policy_b=v.opt_str("policy_b"), id=v.opt_id(),
        )


@dataclasses.dataclass(frozen=True)
class RankedTriple(_Record):
    """POLAR fine-tuning item: `reference` ≻ `chosen` ≻ `rejected`.

    Loss `-log σ(r(p, reference, chosen) - r(p, reference, rejected))`.
    """

    prompt: Prompt
    reference: str
    chosen: str
    rejected: str
    id: RecordId = None

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> RankedTriple:
        v = RowValidator(row, file=file, line=line)
        return cls(
            prompt=v.prompt(), reference=v.req_str("reference"), chosen=v.req_str("chosen"),
            rejected=v.req_str("rejected"), id=v.opt_id(),
        )


@dataclasses.dataclass(frozen=True)
class RankingItem(_Record):
    """N-way ranking item (URPO): `responses[i]` has gold score `gold_scores[i]` (higher = better).

    At least two responses; as many finite numeric scores as responses.
    """

    prompt: Prompt
    responses: tuple[str, ...]
    gold_scores: tuple[float, ...]
    id: RecordId = None

    _sequence_fields: ClassVar[tuple[str, ...]] = ("responses", "gold_scores")

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> RankingItem:
        v = RowValidator(row, file=file, line=line)
        prompt = v.prompt()
        responses = v.str_tuple("responses", min_len=2)
        scores = v.number_tuple("gold_scores", min_len=1)
        if len(scores) != len(responses):
            raise v.error(
                "gold_scores", "length_mismatch",
                f"expected {len(responses)} scores (one per response), got {len(scores)}",
            )
        return cls(prompt=prompt, responses=responses, gold_scores=scores, id=v.opt_id())


@dataclasses.dataclass(frozen=True)
class VerifiableProblem(_Record):
    """RLVR problem: a prompt and the gold answer string a verifier checks against."""

    prompt: Prompt
    answer: str
    id: RecordId = None

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> VerifiableProblem:
        v = RowValidator(row, file=file, line=line)
        return cls(prompt=v.prompt(), answer=v.req_str("answer"), id=v.opt_id())


@dataclasses.dataclass(frozen=True)
class JudgmentExample(_Record):
    """A (prompt, response) with a teacher label (a number, or a bool for correct/incorrect).

    `reference` is an optional reference answer for reference-guided judges.
    """

    prompt: Prompt
    response: str
    label: float | int | bool
    reference: str | None = None
    id: RecordId = None

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], *, file: str = "<dict>", line: int = 0
    ) -> JudgmentExample:
        v = RowValidator(row, file=file, line=line)
        return cls(
            prompt=v.prompt(), response=v.req_str("response"), label=v.number("label", allow_bool=True),
            reference=v.opt_str("reference"), id=v.opt_id(),
        )


RECORD_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        SFTRecord, PreferencePair, PolarQuad, RankedTriple, RankingItem, VerifiableProblem,
        JudgmentExample,
    )
}
"""Record classes by name, for configs (`record_type: PreferencePair`)."""


def record_type_by_name(name: str | type) -> type:
    """The record class for `name` (a class is returned unchanged); unknown names list the valid ones."""
    if isinstance(name, type):
        if name not in RECORD_TYPES.values():
            raise TypeError(f"{name!r} is not a record type; valid: {sorted(RECORD_TYPES)}")
        return name
    try:
        return RECORD_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown record type {name!r}; valid: {sorted(RECORD_TYPES)}") from None


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One prompt of a task, with whatever its reward needs (never shown to the policy but `prompt`).

    task: task name (mixtures, per-task metrics). prompt: str or chat messages.
    answer: gold answer (verifiable tasks). reference: reference response (POLAR).
    responses / gold_scores: candidates and their gold scores (ranking tasks).
    label: teacher label (judge training). id: source record id.
    """

    task: str
    prompt: Any
    answer: str | None = None
    reference: str | None = None
    responses: tuple | None = None
    gold_scores: tuple | None = None
    label: Any = None
    id: Any = None
