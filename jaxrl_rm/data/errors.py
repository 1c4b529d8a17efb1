"""Bad data rows: one error type that names file, line and field, and a skip-and-count policy.

Every loader in `jaxrl_rm.data` reports a malformed row as a `BadRowError`. With
`on_bad_row="error"` (the default) the first one is raised; with `on_bad_row="skip"` the row is
dropped and counted in a `RowStats`, so nothing is lost silently::

    records, stats = load_records("data/train.jsonl", SFTRecord, on_bad_row="skip")
    print(stats)              # read 1000 rows, kept 998, skipped 2 (response:empty_string=2)
    metrics.update(stats.as_metrics())
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

OnBadRow = Literal["error", "skip"]
ON_BAD_ROW_CHOICES: tuple[str, ...] = ("error", "skip")

# Fields that do not name a key of the row: the row as a whole, or the JSON text of the line.
ROW_FIELD = "<row>"
JSON_FIELD = "<json>"


class BadRowError(ValueError):
    """A data row that cannot be used, located by file, 1-based line (or row) number and field.

    Attributes:
      file: the path as the user gave it (or a display name).
      line: 1-based line number in a JSONL file (row number for parquet / HF datasets).
      field: the offending field, nested as `prompt[2].role`; `"<json>"` when the line is not
        valid JSON, `"<row>"` (or None) when the row as a whole is wrong.
      message: what was expected and what was found.
      kind: a short machine-readable reason (`missing`, `wrong_type`, `empty_string`,
        `invalid_json`, ...), used as the key of `RowStats.skipped_by_reason`.

    `str(err)` reads like `data/train.jsonl:17: field 'response': expected a non-empty string,
    got ''`.
    """

    def __init__(
        self,
        file: str,
        line: int,
        field: str | None,
        message: str,
        kind: str = "invalid",
    ):
        self.file = str(file)
        self.line = int(line)
        self.field = field
        self.message = message
        self.kind = kind
        super().__init__(self._format())

    def _format(self) -> str:
        if self.field in (None, ROW_FIELD, JSON_FIELD):
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}:{self.line}: field '{self.field}': {self.message}"

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self):  # picklable across grain / multiprocessing workers
        return (type(self), (self.file, self.line, self.field, self.message, self.kind))

    @property
    def reason(self) -> str:
        """`field:kind` with list indices dropped (`prompt[].role:bad_role`): a counting key."""
        field = self.field if self.field is not None else ROW_FIELD
        return f"{_INDEX_RE.sub('[]', field)}:{self.kind}"


_INDEX_RE = re.compile(r"\[\d+\]")


def describe_value(value: object, limit: int = 60) -> str:
    """Short, safe description of a bad value for error messages: `''`, `int 5`, `list [...]`."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 4] + "...'"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if value is None or isinstance(value, bool):
        return text
    return f"{type(value).__name__} {text}"


@dataclasses.dataclass
class RowStats:
    """What a loader read, skipped and deliberately filtered. Mutable; one per load.

    rows_read: rows (non-blank lines, parquet rows, ...) read from the source(s), bad ones included.
    rows_skipped: rows dropped as bad under `on_bad_row="skip"`.
    skipped_by_reason: `"field:kind"` -> count of skipped rows (see `BadRowError.reason`).
    filtered_by_reason: items dropped on purpose by a loader option, not errors (for example
      AlpacaEval pairs closer than `min_gap`): reason -> count.
    first_errors: the first `max_kept_errors` skipped errors, for logs and debugging.
    """

    rows_read: int = 0
    rows_skipped: int = 0
    skipped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    filtered_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    first_errors: list[BadRowError] = dataclasses.field(default_factory=list)
    max_kept_errors: int = 100

    @property
    def rows_ok(self) -> int:
        """Rows read and not skipped."""
        return self.rows_read - self.rows_skipped

    def record_skip(self, err: BadRowError) -> None:
        self.rows_skipped += 1
        key = err.reason
        self.skipped_by_reason[key] = self.skipped_by_reason.get(key, 0) + 1
        if len(self.first_errors) < self.max_kept_errors:
            self.first_errors.append(err)

    def record_filtered(self, reason: str, n: int = 1) -> None:
        self.filtered_by_reason[reason] = self.filtered_by_reason.get(reason, 0) + n

    def merge(self, other: RowStats) -> RowStats:
        """Add `other`'s counts into this one (in place) and return self."""
        self.rows_read += other.rows_read
        self.rows_skipped += other.rows_skipped
        for k, v in other.skipped_by_reason.items():
            self.skipped_by_reason[k] = self.skipped_by_reason.get(k, 0) + v
        for k, v in other.filtered_by_reason.items():
            self.filtered_by_reason[k] = self.filtered_by_reason.get(k, 0) + v
        room = self.max_kept_errors - len(self.first_errors)
        self.first_errors.extend(other.first_errors[: max(room, 0)])
        return self

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat scalar dict for the metrics log."""
        out = {f"{prefix}rows_read": self.rows_read, f"{prefix}rows_skipped": self.rows_skipped}
        for k, v in sorted(self.skipped_by_reason.items()):
            out[f"{prefix}skipped/{k}"] = v
        for k, v in sorted(self.filtered_by_reason.items()):
            out[f"{prefix}filtered/{k}"] = v
        return out

    def __str__(self) -> str:
        text = f"read {self.rows_read} rows, kept {self.rows_ok}, skipped {self.rows_skipped}"
        if self.skipped_by_reason:
            text += " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_by_reason.items())) + ")"
        if self.filtered_by_reason:
            text += "; filtered " + ", ".join(
                f"{k}={v}" for k, v in sorted(self.filtered_by_reason.items())
            )
        return text


class BadRowPolicy:
    """Applies `on_bad_row` to errors and keeps the counts.

    Loaders call `row_read()` once per row taken from a source and `bad(err)` for each bad row:
    in "error" mode `bad` raises `err`; in "skip" mode it records it in `stats` and returns, and
    the caller drops the row.
    """

    def __init__(self, on_bad_row: str = "error", stats: RowStats | None = None):
        if on_bad_row not in ON_BAD_ROW_CHOICES:
            raise ValueError(
                f"on_bad_row must be one of {list(ON_BAD_ROW_CHOICES)}, got {on_bad_row!r}"
            )
        self.on_bad_row = on_bad_row
        self.stats = stats if stats is not None else RowStats()

    @classmethod
    def coerce(cls, on_bad_row: str | BadRowPolicy, stats: RowStats | None = None) -> BadRowPolicy:
        """A policy from a mode string, or the given policy itself (then `stats` must be None)."""
        if isinstance(on_bad_row, BadRowPolicy):
            if stats is not None and stats is not on_bad_row.stats:
                raise ValueError("pass stats either inside the BadRowPolicy or separately, not both")
            return on_bad_row
        return cls(on_bad_row, stats)

    @property
    def skip(self) -> bool:
        return self.on_bad_row == "skip"

    def row_read(self, n: int = 1) -> None:
        self.stats.rows_read += n

    def bad(self, err: BadRowError) -> None:
        """Raise `err` ("error") or count it ("skip")."""
        if self.on_bad_row == "error":
            raise err from None
        self.stats.record_skip(err)

    def __repr__(self) -> str:
        return f"BadRowPolicy({self.on_bad_row!r}, {self.stats})"
