"""Loaders: JSONL(.gz) / parquet / HF dataset dirs into records, and the public data sets we use.

Generic:
  read_jsonl(path)                  -> (line_no, dict) rows of a .jsonl / .jsonl.gz file
  iter_rows(path)                   -> the same for .jsonl(.gz), .parquet or a `save_to_disk` dir
  iter_records / load_records       -> validated records of one type, with optional field renaming
  write_jsonl(path, records)        -> the inverse (records or dicts; .gz compresses)

Data sets (each returns `(records, RowStats)`):
  load_hh_rlhf                      Anthropic HH-RLHF transcripts -> PreferencePair
  load_alpaca_eval_outputs          AlpacaEval outputs grouped by instruction (many policies)
  load_alpaca_eval_annotations      AlpacaEval judge preferences vs the baseline
  load_alpaca_eval_triples          AlpacaEval -> POLAR RankedTriple (baseline answer = reference)
  load_gsm8k                        GSM8K -> VerifiableProblem (gold answer after '#### ')
  load_gsm8k_solutions              GSM8K model solutions -> JudgmentExample (label = is_correct)
  load_math                         MATH / competition JSONL -> VerifiableProblem (gold: `answer`, else
                                    the solution's last \boxed{})
  load_verifiable(source)           `gsm8k:<path>` | `math:<path>` | a {prompt, answer} file -> VerifiableProblem

Every loader takes `on_bad_row="error"|"skip"` (or a `BadRowPolicy` to share counts across
files). Errors are `BadRowError`s naming file, 1-based line and field; skipped rows are counted in
the returned `RowStats`, items dropped on purpose (near-ties, ...) in `stats.filtered_by_reason`.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import gzip
import itertools
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from jaxrl_rm.data.errors import (
    JSON_FIELD,
    BadRowError,
    BadRowPolicy,
    RowStats,
    describe_value,
)
from jaxrl_rm.data.records import (
    JudgmentExample,
    PreferencePair,
    RankedTriple,
    RowValidator,
    VerifiableProblem,
    record_type_by_name,
)

PathLike = str | os.PathLike
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _json_error(file: str, line: int, message: str, kind: str) -> BadRowError:
    return BadRowError(file, line, JSON_FIELD, message, kind)


def parse_json_line(raw: bytes | str, *, file: str, line: int) -> dict[str, Any]:
    """One JSONL line -> dict, or `BadRowError` (field "<json>") for bad UTF-8, invalid JSON,
    duplicate keys or a value that is not a JSON object."""
    if isinstance(raw, bytes):
        if line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _json_error(file, line, f"invalid UTF-8 at byte {e.start}", "invalid_utf8") from None
    else:
        text = raw
    text = text.rstrip("\r\n")  # so error columns point into the line
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        msg = f"invalid JSON: {e.msg} (column {e.colno})"
        raise _json_error(file, line, msg, "invalid_json") from None
    except _DuplicateKey as e:
        msg = f"invalid JSON: duplicate key {str(e.args[0])!r}"
        raise _json_error(file, line, msg, "duplicate_key") from None
    except RecursionError:
        raise _json_error(file, line, "invalid JSON: nested too deeply", "invalid_json") from None
    if not isinstance(value, dict):
        msg = f"expected a JSON object, got {describe_value(value)}"
        raise _json_error(file, line, msg, "not_object")
    return value


def read_jsonl(
    path: PathLike,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    stats: RowStats | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_no, row)` for each non-blank line of a `.jsonl` or `.jsonl.gz` file.

    line_no is 1-based and counts blank lines, so it matches an editor. Blank lines are ignored
    (not counted as rows). A line that is not a JSON object is a `BadRowError` with field
    "<json>": raised, or skipped and counted in `stats` (or the policy's stats). A corrupt or
    truncated gzip stream raises `ValueError` naming the file (a file-level error, not a row).
    """
    policy = BadRowPolicy.coerce(on_bad_row, stats)
    name = str(path)
    opener = gzip.open if name.endswith(".gz") else open
    line_no = 0
    with opener(path, "rb") as f:
        it = iter(f)
        while True:
            try:
                raw = next(it)
            except StopIteration:
                break
            except (EOFError, OSError, zlib.error) as e:
                raise ValueError(f"{name}: unreadable after line {line_no}: {e}") from e
            line_no += 1
            if not raw.strip():
                continue
            policy.row_read()
            try:
                row = parse_json_line(raw, file=name, line=line_no)
            except BadRowError as err:
                policy.bad(err)
                continue
            yield line_no, row


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def iter_rows(
    path: PathLike,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    stats: RowStats | None = None,
    split: str | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(row_no, row)` from a JSONL(.gz) file, a `.parquet` file or a HF `save_to_disk` dir.

    row_no is the 1-based line (JSONL) or row index (parquet, HF). `split` picks a split of a
    saved `DatasetDict`. Parquet uses pyarrow and HF dirs `datasets`, imported only when needed.
    """
    policy = BadRowPolicy.coerce(on_bad_row, stats)
    p = Path(path)
    name = str(path)
    if name.endswith(JSONL_SUFFIXES):
        yield from read_jsonl(path, on_bad_row=policy)
        return
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        row_no = 0
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                policy.row_read()
                yield row_no, row
        return
    if _is_hf_dataset_dir(p):
        import datasets

        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise ValueError(f"{name} is a DatasetDict; pass split= one of {sorted(ds)}")
            if split not in ds:
                raise ValueError(f"{name}: no split {split!r}; valid: {sorted(ds)}")
            ds = ds[split]
        elif split is not None:
            raise ValueError(f"{name} is a single Dataset; split={split!r} does not apply")
        for row_no, row in enumerate(ds, start=1):
            policy.row_read()
            yield row_no, row
        return
    if not p.exists():
        raise FileNotFoundError(name)
    raise ValueError(
        f"{name}: unsupported data source; expected a file ending in "
        f"{', '.join(JSONL_SUFFIXES)} or .parquet, or a datasets `save_to_disk` directory"
    )


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _check_field_map(field_map: Mapping[str, str] | None, cls: type) -> dict[str, str]:
    if not field_map:
        return {}
    valid = [f.name for f in dataclasses.fields(cls)]
    targets = list(field_map.values())
    for src, dst in field_map.items():
        if dst not in valid:
            raise ValueError(
                f"field_map {src!r} -> {dst!r}: {cls.__name__} has no field {dst!r}; valid: {valid}"
            )
    dup = {d for d in targets if targets.count(d) > 1}
    if dup:
        raise ValueError(f"field_map maps several source fields onto {sorted(dup)}")
    return dict(field_map)


def _rename(row: dict[str, Any], fmap: dict[str, str], file: str, line: int) -> dict[str, Any]:
    out = dict(row)
    for src, dst in fmap.items():
        if src == dst or src not in row:
            continue
        if dst in row:
            raise BadRowError(
                file, line, src,
                f"field_map renames {src!r} to {dst!r} but the row already has {dst!r}", "conflict",
            )
        out[dst] = out.pop(src)
    return out


def _unmap(err: BadRowError, fmap: dict[str, str], row: Mapping[str, Any]) -> BadRowError:
    """Name the field as it is in the file: errors on renamed fields report the source name."""
    if not fmap or err.field is None:
        return err
    inverse = {dst: src for src, dst in fmap.items() if src != dst and src in row}
    m = re.match(r"[^\[.]+", err.field)
    root = m.group(0) if m else err.field
    if root not in inverse:
        # A required target missing: say which source names would have filled it.
        missing_src = [s for s, d in fmap.items() if d == root and s != d]
        if err.kind == "missing" and missing_src:
            return BadRowError(
                err.file, err.line, missing_src[0],
                f"{err.message} (field_map: {missing_src[0]!r} -> {root!r})", err.kind,
            )
        return err
    src = inverse[root]
    return BadRowError(
        err.file, err.line, src + err.field[len(root):],
        f"{err.message} (field_map: {src!r} -> {root!r})", err.kind,
    )


def iter_records(
    path: PathLike,
    record_type: type | str,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    field_map: Mapping[str, str] | None = None,
    split: str | None = None,
    stats: RowStats | None = None,
) -> Iterator[Any]:
    """Stream validated records of `record_type` from `path` (see `iter_rows` for formats).

    field_map: `{name_in_file: record_field}`, e.g. `{"question": "prompt"}`; errors name the
    field as it is in the file. A row holding both names of a renamed pair is a bad row.
    """
    cls = record_type_by_name(record_type)
    policy = BadRowPolicy.coerce(on_bad_row, stats)
    fmap = _check_field_map(field_map, cls)
    name = str(path)
    for line, row in iter_rows(path, on_bad_row=policy, split=split):
        try:
            renamed = _rename(row, fmap, name, line) if fmap else row
            record = cls.from_dict(renamed, file=name, line=line)
        except BadRowError as err:
            policy.bad(_unmap(err, fmap, row))
            continue
        yield record


def load_records(
    path: PathLike,
    record_type: type | str,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    field_map: Mapping[str, str] | None = None,
    split: str | None = None,
) -> tuple[list[Any], RowStats]:
    """All records of `record_type` in `path`, and the row counts. See `iter_records`."""
    policy = BadRowPolicy.coerce(on_bad_row)
    records = list(iter_records(path, record_type, on_bad_row=policy, field_map=field_map, split=split))
    return records, policy.stats


def write_jsonl(path: PathLike, items: Iterable[Any]) -> int:
    """Write records (via `to_dict()`) or dicts as JSONL (gzip if the name ends in .gz); returns
    the number of rows written."""
    name = str(path)
    opener = gzip.open if name.endswith(".gz") else open
    n = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for item in items:
            row = item.to_dict() if hasattr(item, "to_dict") else item
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _stem(path: PathLike) -> str:
    """`data/harmless_base_test.jsonl.gz` -> `harmless_base_test` (for record ids)."""
    base = os.path.basename(str(path))
    for suffix in (".gz", ".jsonl", ".ndjson", ".parquet", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


# --------------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# --------------------------------------------------------------------------------------------

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_turns(text: str) -> list[dict[str, str]] | None:
    """`\\n\\nHuman: a\\n\\nAssistant: b` -> `[{"role": "user", "content": "a"}, {"role":
    "assistant", "content": "b"}]` (contents stripped); None if non-blank text precedes the first
    turn marker. Only markers preceded by a blank line count: an inline "Human:" is content."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        return None
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, by binary search on slice equality (C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo]; a[:hi+1] != b[:hi+1] unless hi is the end
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_hh_pair(chosen: str, rejected: str) -> int | None:
    """Length of the shared prompt of two HH transcripts, or None.

    The prompt runs up to and including the last `\\n\\nAssistant:` marker that lies wholly in
    the common prefix of both transcripts; everything after it is that transcript's final
    response. (Splitting at each transcript's *last* marker instead would misread rows whose
    response itself contains a marker, e.g. a model that wrote a fake `Human:` turn.)
    """
    common = _common_prefix_len(chosen, rejected)
    start = chosen.rfind(HH_ASSISTANT, 0, common)
    return None if start < 0 else start + len(HH_ASSISTANT)


def load_hh_rlhf(
    path: PathLike,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    prompt_format: Literal["messages", "text"] = "messages",
    allow_empty_response: bool = False,
    subset: str | None = None,
) -> tuple[list[PreferencePair], RowStats]:
    """HH-RLHF rows `{"chosen", "rejected"}` (full transcripts) -> `PreferencePair`s.

    The prompt is the shared prefix up to and including the last `\\n\\nAssistant:` marker
    common to both transcripts (`split_hh_pair`); chosen / rejected are the two final assistant
    turns.

    prompt_format="messages" (default): prompt is a message list (roles user / assistant,
      contents stripped), chosen / rejected are stripped strings. Consecutive same-role turns in
      the source are kept as separate messages.
    prompt_format="text": prompt is the raw transcript prefix ending in `\\n\\nAssistant:` and
      chosen / rejected the raw remainders, so `prompt + chosen` is the original transcript.

    Bad rows: a missing / non-string / empty transcript; no shared prefix ending at an
    Assistant marker (field 'rejected', or the transcript without any marker); text before the
    first turn or no Human turn in the prompt (messages format); an empty final assistant turn
    (field 'chosen' / 'rejected', kind `empty_response`) unless `allow_empty_response=True`.
    Ids are `"<file stem>:<line>"`; `subset` is copied into every pair.
    """
    if prompt_format not in ("messages", "text"):
        raise ValueError(f"prompt_format must be 'messages' or 'text', got {prompt_format!r}")
    policy = BadRowPolicy.coerce(on_bad_row)
    name, stem = str(path), _stem(path)
    out: list[PreferencePair] = []
    for line, row in read_jsonl(path, on_bad_row=policy):
        try:
            out.append(_hh_pair(row, name, line, stem, prompt_format, allow_empty_response, subset))
        except BadRowError as err:
            policy.bad(err)
    return out, policy.stats


def _hh_pair(
    row: dict[str, Any], file: str, line: int, stem: str, prompt_format: str,
    allow_empty: bool, subset: str | None,
) -> PreferencePair:
    v = RowValidator(row, file=file, line=line)
    chosen, rejected = v.req_str("chosen"), v.req_str("rejected")
    end = split_hh_pair(chosen, rejected)
    if end is None:
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            if HH_ASSISTANT not in text:
                raise v.error(field, "bad_transcript", "transcript has no '\\n\\nAssistant:' turn")
        raise v.error(
            "rejected", "no_common_prompt",
            "does not share a prefix ending at an '\\n\\nAssistant:' turn with 'chosen'",
        )
    ch, rj = chosen[end:], rejected[end:]
    if not allow_empty:
        for field, text in (("chosen", ch), ("rejected", rj)):
            if not text.strip():
                raise v.error(
                    field, "empty_response",
                    f"final assistant turn is empty (got {describe_value(text)})",
                )
    rid = f"{stem}:{line}"
    if prompt_format == "text":
        return PreferencePair(prompt=chosen[:end], chosen=ch, rejected=rj, subset=subset, id=rid)
    messages = parse_hh_turns(chosen[: end - len(HH_ASSISTANT)])
    if messages is None:
        raise v.error("chosen", "bad_transcript", "text before the first '\\n\\nHuman:' turn")
    if not any(m["role"] == "user" for m in messages):
        raise v.error(
            "chosen", "bad_transcript", "no '\\n\\nHuman:' turn before the final Assistant turn"
        )
    return PreferencePair(
        prompt=tuple(messages), chosen=ch.strip(), rejected=rj.strip(), subset=subset, id=rid
    )


# --------------------------------------------------------------------------------------------
# AlpacaEval
# --------------------------------------------------------------------------------------------

ALPACA_EVAL_BASELINE = "gpt4_1106_preview"


@dataclasses.dataclass(frozen=True)
class InstructionOutputs:
    """One AlpacaEval instruction and every generator's answer to it (generator -> output)."""

    id: int | str
    instruction: str
    dataset: str | None
    outputs: dict[str, str]


@dataclasses.dataclass(frozen=True)
class AlpacaEvalAnnotation:
    """One judge verdict: `preference` in [1, 2]; above 1.5 means `generator` beat `baseline`."""

    id: int | str
    generator: str
    baseline: str
    preference: float


def _id_sort_key(x: int | str) -> tuple[int, int | str]:
    return (0, x) if isinstance(x, int) else (1, x)


def _required_id(v: RowValidator) -> int | str:
    rid = v.opt_id("id")
    if rid is None:
        raise v.error("id", "missing", "required field is missing")
    return rid


def load_alpaca_eval_outputs(
    path: PathLike, *, on_bad_row: str | BadRowPolicy = "error"
) -> tuple[dict[int | str, InstructionOutputs], RowStats]:
    """AlpacaEval outputs rows `{"id", "dataset", "instruction", "generator", "output"}` grouped
    by instruction id (ids sorted; generators in file order).

    Bad rows: wrong / missing / empty fields; a second output of the same generator for an id
    (field 'generator', kind `duplicate`); an instruction text that differs from the one first
    seen for the same id (field 'instruction', kind `conflict`).
    """
    policy = BadRowPolicy.coerce(on_bad_row)
    name = str(path)
    groups: dict[int | str, InstructionOutputs] = {}
    for line, row in read_jsonl(path, on_bad_row=policy):
        try:
            v = RowValidator(row, file=name, line=line)
            rid = _required_id(v)
            instruction = v.req_str("instruction")
            generator = v.req_str("generator")
            output = v.req_str("output")
            dataset = v.opt_str("dataset")
            group = groups.get(rid)
            if group is None:
                groups[rid] = InstructionOutputs(rid, instruction, dataset, {generator: output})
                continue
            if instruction != group.instruction:
                raise v.error(
                    "instruction", "conflict",
                    f"differs from the instruction first seen for id {rid!r}",
                )
            if generator in group.outputs:
                raise v.error(
                    "generator", "duplicate", f"second output of {generator!r} for id {rid!r}"
                )
            group.outputs[generator] = output
        except BadRowError as err:
            policy.bad(err)
    return {k: groups[k] for k in sorted(groups, key=_id_sort_key)}, policy.stats


def _iter_alpaca_annotations(
    path: PathLike, policy: BadRowPolicy
) -> Iterator[tuple[int, AlpacaEvalAnnotation]]:
    name = str(path)
    seen: set[tuple[Any, str, str]] = set()
    for line, row in read_jsonl(path, on_bad_row=policy):
        try:
            v = RowValidator(row, file=name, line=line)
            rid = _required_id(v)
            generator, baseline = v.req_str("generator"), v.req_str("baseline")
            pref = float(v.number("preference"))
            if not 1.0 <= pref <= 2.0:
                raise v.error("preference", "out_of_range", f"expected a number in [1, 2], got {pref!r}")
            key = (rid, generator, baseline)
            if key in seen:
                raise v.error(
                    "generator", "duplicate",
                    f"second annotation of {generator!r} vs {baseline!r} for id {rid!r}",
                )
            seen.add(key)
        except BadRowError as err:
            policy.bad(err)
            continue
        yield line, AlpacaEvalAnnotation(rid, generator, baseline, pref)


def load_alpaca_eval_annotations(
    path: PathLike, *, on_bad_row: str | BadRowPolicy = "error"
) -> tuple[list[AlpacaEvalAnnotation], RowStats]:
    """AlpacaEval annotation rows `{"id", "generator", "baseline", "preference"}` in file order.

    Bad rows: wrong / missing fields, preference not a finite number in [1, 2], a repeated
    (id, generator, baseline).
    """
    policy = BadRowPolicy.coerce(on_bad_row)
    return [a for _, a in _iter_alpaca_annotations(path, policy)], policy.stats


def load_alpaca_eval_triples(
    outputs_path: PathLike,
    annotations_path: PathLike,
    *,
    baseline: str = ALPACA_EVAL_BASELINE,
    min_gap: float = 0.1,
    generators: Sequence[str] | None = None,
    on_bad_row: str | BadRowPolicy = "error",
) -> tuple[list[RankedTriple], RowStats]:
    """AlpacaEval -> POLAR ranked triples `reference ≻ chosen ≻ rejected`.

    For each instruction: reference = the `baseline` generator's output; for every pair of
    other annotated generators (judged against that baseline) whose preferences differ by at
    least `min_gap` (and are not equal), chosen = the higher-preference generator's output,
    rejected = the other's. Order: instruction id, then generator pair in name order. Ids are
    `"<instruction id>:<chosen generator>><rejected generator>"`. `generators` restricts the
    candidates.

    `stats` counts rows of both files. Deliberately dropped (`stats.filtered_by_reason`):
    `annotation_other_baseline`, `annotation_baseline_vs_itself`, `annotation_generator_not_selected`,
    `pair_near_tie`, `pair_identical_outputs`. Bad annotation rows, besides malformed ones: an id
    absent from the outputs file (field 'id'), no output of the generator (field 'generator') or
    of the baseline (field 'baseline') for that id.
    """
    if not (isinstance(min_gap, (int, float)) and math.isfinite(min_gap) and min_gap >= 0):
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap!r}")
    policy = BadRowPolicy.coerce(on_bad_row)
    stats = policy.stats
    outputs, _ = load_alpaca_eval_outputs(outputs_path, on_bad_row=policy)
    selected = None if generators is None else set(generators)
    ann_name = str(annotations_path)
    prefs: dict[int | str, dict[str, float]] = {}
    for line, ann in _iter_alpaca_annotations(annotations_path, policy):
        if ann.baseline != baseline:
            stats.record_filtered("annotation_other_baseline")
            continue
        if ann.generator == baseline:
            stats.record_filtered("annotation_baseline_vs_itself")
            continue
        if selected is not None and ann.generator not in selected:
            stats.record_filtered("annotation_generator_not_selected")
            continue
        item = outputs.get(ann.id)
        err = None
        if item is None:
            msg = f"no instruction with id {ann.id!r} in {outputs_path}"
            err = BadRowError(ann_name, line, "id", msg, "unknown_id")
        else:
            for field, gen in (("baseline", baseline), ("generator", ann.generator)):
                if gen not in item.outputs:
                    msg = f"no output of {gen!r} for id {ann.id!r} in {outputs_path}"
                    err = BadRowError(ann_name, line, field, msg, "missing_output")
                    break
        if err is not None:
            policy.bad(err)
            continue
        prefs.setdefault(ann.id, {})[ann.generator] = ann.preference

    triples: list[RankedTriple] = []
    for rid in sorted(prefs, key=_id_sort_key):
        item, by_gen = outputs[rid], prefs[rid]
        reference = item.outputs[baseline]
        for g1, g2 in itertools.combinations(sorted(by_gen), 2):
            p1, p2 = by_gen[g1], by_gen[g2]
            if p1 == p2 or abs(p1 - p2) < min_gap:
                stats.record_filtered("pair_near_tie")
                continue
            hi, lo = (g1, g2) if p1 > p2 else (g2, g1)
            if item.outputs[hi] == item.outputs[lo]:
                stats.record_filtered("pair_identical_outputs")
                continue
            triples.append(
                RankedTriple(
                    prompt=item.instruction, reference=reference, chosen=item.outputs[hi],
                    rejected=item.outputs[lo], id=f"{rid}:{hi}>{lo}",
                )
            )
    return triples, stats


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

GSM8K_POLICIES: tuple[str, ...] = (
    "6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification",
)
_NUMBER_WITH_COMMAS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


def extract_gsm8k_answer(solution: str, *, strip_commas: bool = True) -> str | None:
    """The gold answer after the single `####` marker of a GSM8K solution (stripped), or None if
    there is not exactly one marker or nothing single-line follows it. With `strip_commas`,
    thousands separators are dropped from numbers (`1,080` -> `1080`), as in OpenAI's grader."""
    parts = solution.split("####")
    if len(parts) != 2:
        return None
    answer = parts[1].strip()
    if not answer or "\n" in answer:
        return None
    if strip_commas and _NUMBER_WITH_COMMAS.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def load_gsm8k(
    path: PathLike,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    strip_commas: bool = True,
) -> tuple[list[VerifiableProblem], RowStats]:
    """GSM8K rows `{"question", "answer"}` -> `VerifiableProblem(prompt=question, answer=gold)`,
    gold = the text after `#### ` (see `extract_gsm8k_answer`). Ids `"<file stem>:<line>"`.

    Bad rows: missing / empty fields; an answer without exactly one `####` followed by a
    one-line answer (field 'answer', kind `no_final_answer`).
    """
    policy = BadRowPolicy.coerce(on_bad_row)
    name, stem = str(path), _stem(path)
    out: list[VerifiableProblem] = []
    for line, row in read_jsonl(path, on_bad_row=policy):
        try:
            v = RowValidator(row, file=name, line=line)
            question, solution = v.req_str("question"), v.req_str("answer")
            gold = extract_gsm8k_answer(solution, strip_commas=strip_commas)
            if gold is None:
                raise v.error(
                    "answer", "no_final_answer",
                    f"expected exactly one '#### <answer>' line, got {describe_value(solution[-40:])}",
                )
        except BadRowError as err:
            policy.bad(err)
            continue
        out.append(VerifiableProblem(prompt=question, answer=gold, id=f"{stem}:{line}"))
    return out, policy.stats


def _literal_dict(v: RowValidator, value: Any, field: str) -> Mapping[str, Any]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)  # Python repr of a dict; never eval()
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise v.error(
                    field, "bad_literal",
                    f"expected a dict or its Python repr, got {describe_value(value)}",
                ) from None
    if not isinstance(value, Mapping):
        raise v.error(field, "wrong_type", f"expected a dict, got {describe_value(value)}")
    return value


def load_gsm8k_solutions(
    path: PathLike,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    policies: Sequence[str] = GSM8K_POLICIES,
) -> tuple[list[JudgmentExample], RowStats]:
    """GSM8K model solutions -> one `JudgmentExample` per (row, policy).

    Rows: `{"question", "ground_truth", <policy>: {"is_correct": bool, "solution": str}, ...}`,
    each policy field a dict or its Python repr string (parsed with `ast.literal_eval`). Example:
    prompt = question, response = solution, label = is_correct (bool), reference = ground_truth,
    id = `"<file stem>:<line>:<policy>"`. A row with any bad policy field is a bad row (field
    like `6b_finetuning.is_correct`) and none of its examples are kept.
    """
    policy = BadRowPolicy.coerce(on_bad_row)
    name, stem = str(path), _stem(path)
    out: list[JudgmentExample] = []
    for line, row in read_jsonl(path, on_bad_row=policy):
        try:
            v = RowValidator(row, file=name, line=line)
            question, truth = v.req_str("question"), v.req_str("ground_truth")
            examples = []
            for pol in policies:
                if pol not in row:
                    raise v.error(pol, "missing", "required field is missing")
                d = _literal_dict(v, row[pol], pol)
                if "is_correct" not in d:
                    raise v.error(f"{pol}.is_correct", "missing", "required field is missing")
                if not isinstance(d["is_correct"], bool):
                    raise v.error(
                        f"{pol}.is_correct", "wrong_type",
                        f"expected a bool, got {describe_value(d['is_correct'])}",
                    )
                if "solution" not in d:
                    raise v.error(f"{pol}.solution", "missing", "required field is missing")
                solution = v.check_str(d["solution"], f"{pol}.solution")
                examples.append(
                    JudgmentExample(
                        prompt=question, response=solution, label=d["is_correct"],
                        reference=truth, id=f"{stem}:{line}:{pol}",
                    )
                )
        except BadRowError as err:
            policy.bad(err)
            continue
        out.extend(examples)
    return out, policy.stats


# --------------------------------------------------------------------------------------------
# MATH (competition-style problems with a \boxed{} final answer)
# --------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*\{|\s+(?=[^\s{]))")


def extract_boxed_answer(solution: str) -> str | None:
    r"""The final answer of a MATH solution: the contents of its last `\boxed{…}` (or `\fbox{…}`),
    braces balanced (`\boxed{\frac{1}{2}}` -> `\frac{1}{2}`), stripped. The brace-less form
    `\boxed 5` gives the token after it. None if there is no box, the last one is never closed, or
    it is empty.

    >>> extract_boxed_answer(r"so $x = \boxed{\frac{1}{2}}$. Check: $\boxed{\{1, 2\}}$.")
    '\\{1, 2\\}'
    """
    starts = list(_BOXED_RE.finditer(solution))
    if not starts:
        return None
    m = starts[-1]
    if not m.group(0).endswith("{"):
        token = re.match(r"[^\s$]+", solution[m.end():])
        return (token.group(0).rstrip(".,;") or None) if token else None
    depth, i = 1, m.end()
    while i < len(solution) and depth:
        c = solution[i]
        if c == "\\":  # an escaped character (\{, \}) never opens or closes
            i += 2
            continue
        depth += c == "{"
        depth -= c == "}"
        i += 1
    if depth:
        return None
    return solution[m.end(): i - 1].strip() or None


def load_math(
    path: PathLike,
    *,
    on_bad_row: str | BadRowPolicy = "error",
) -> tuple[list[VerifiableProblem], RowStats]:
    r"""MATH / competition-style rows -> `VerifiableProblem(prompt=problem, answer=gold)`.

    Rows: `{"problem", "solution", ...}` (Hendrycks MATH: also `level`, `type`) or
    `{"problem", "answer", ...}` (MATH-500, AIME-style sets; an int answer is accepted). Gold =
    the row's `answer` when present, else the last `\boxed{…}` / `\fbox{…}` of `solution`
    (`extract_boxed_answer`: nested braces kept, e.g. `\frac{1}{2}`). Reads JSONL(.gz), parquet
    or a HF `save_to_disk` dir (`iter_rows`). Ids `"<file stem>:<line>"`.

    Bad rows: missing / empty `problem`; neither `answer` nor `solution`; an `answer` that is not
    a non-empty string or an int; a `solution` without a closed, non-empty `\boxed{}` (field
    'solution', kind `no_final_answer`).
    """
    policy = BadRowPolicy.coerce(on_bad_row)
    name, stem = str(path), _stem(path)
    out: list[VerifiableProblem] = []
    for line, row in iter_rows(path, on_bad_row=policy):
        try:
            v = RowValidator(row, file=name, line=line)
            problem = v.req_str("problem")
            answer = row.get("answer")
            if isinstance(answer, int) and not isinstance(answer, bool):
                gold = str(answer)
            elif answer is not None:
                gold = v.check_str(answer, "answer").strip()
            else:
                if row.get("solution") is None:
                    raise v.error("solution", "missing", "required field is missing (no 'answer' either)")
                solution = v.req_str("solution")
                found = extract_boxed_answer(solution)
                if found is None:
                    raise v.error(
                        "solution", "no_final_answer",
                        f"expected a closed, non-empty \\boxed{{...}}, got {describe_value(solution[-40:])}",
                    )
                gold = found
        except BadRowError as err:
            policy.bad(err)
            continue
        out.append(VerifiableProblem(prompt=problem, answer=gold, id=f"{stem}:{line}"))
    return out, policy.stats


# --------------------------------------------------------------------------------------------
# Verifiable-problem sources: `gsm8k:<path>`, `math:<path>` or a {prompt, answer} file
# --------------------------------------------------------------------------------------------

#: Data-source prefixes of public verifiable formats (`TaskSpec.data`, `judge.problems`, SFT data).
PROBLEM_FORMATS: dict[str, Any] = {"gsm8k": load_gsm8k, "math": load_math}


def problem_format(source: str) -> str | None:
    """`math:data/test.jsonl` -> `"math"`; `gsm8k:…` -> `"gsm8k"`; any other source -> None."""
    head, sep, _ = str(source).partition(":")
    return head if sep and head in PROBLEM_FORMATS else None


def load_verifiable(
    source: str,
    *,
    on_bad_row: str | BadRowPolicy = "error",
    field_map: Mapping[str, str] | None = None,
) -> tuple[list[VerifiableProblem], RowStats]:
    """Verifiable problems of a data source: `gsm8k:<path>` (`load_gsm8k`: gold after `####`),
    `math:<path>` (`load_math`: gold = `answer`, else the solution's last `\\boxed{}`), or a file
    of `{prompt, answer}` rows (`load_records`, renamed by `field_map`)."""
    fmt = problem_format(source)
    if fmt is None:
        return load_records(source, VerifiableProblem, on_bad_row=on_bad_row, field_map=field_map)
    if field_map:
        raise ValueError(f"field_map does not apply to a {fmt}: source ({source}); its fields are fixed")
    return PROBLEM_FORMATS[fmt](source[len(fmt) + 1:], on_bad_row=on_bad_row)


__all__ = [
    "ALPACA_EVAL_BASELINE",
    "AlpacaEvalAnnotation",
    "GSM8K_POLICIES",
    "InstructionOutputs",
    "PROBLEM_FORMATS",
    "extract_boxed_answer",
    "extract_gsm8k_answer",
    "iter_records",
    "iter_rows",
    "load_alpaca_eval_annotations",
    "load_alpaca_eval_outputs",
    "load_alpaca_eval_triples",
    "load_gsm8k",
    "load_gsm8k_solutions",
    "load_hh_rlhf",
    "load_math",
    "load_records",
    "load_verifiable",
    "parse_hh_turns",
    "parse_json_line",
    "problem_format",
    "read_jsonl",
    "split_hh_pair",
    "write_jsonl",
]
