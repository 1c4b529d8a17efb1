"""Record types, bad-row handling and loaders on synthetic files (no shared data needed)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrl_rm.data.errors import BadRowError, BadRowPolicy, RowStats
from jaxrl_rm.data.loaders import (
    extract_boxed_answer,
    iter_records,
    load_alpaca_eval_annotations,
    load_alpaca_eval_outputs,
    load_alpaca_eval_triples,
    load_gsm8k,
    load_gsm8k_solutions,
    load_hh_rlhf,
    load_math,
    load_records,
    load_verifiable,
    problem_format,
    read_jsonl,
    split_hh_pair,
    write_jsonl,
)
from jaxrl_rm.data.records import (
    RECORD_TYPES,
    JudgmentExample,
    PolarQuad,
    PreferencePair,
    RankedTriple,
    RankingItem,
    SFTRecord,
    VerifiableProblem,
    record_type_by_name,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": ""},  # empty content is allowed in a message
    {"role": "user", "content": "And now?"},
]

GOOD: dict[type, dict] = {
    SFTRecord: {"prompt": "Say hi", "response": "hi", "id": "s1"},
    PreferencePair: {"prompt": MSGS, "chosen": "a", "rejected": "b", "subset": "x", "id": 3},
    PolarQuad: {"prompt": "p", "a1": "x", "a2": "y", "b1": "z", "policy_a": "A", "policy_b": "B"},
    RankedTriple: {"prompt": MSGS, "reference": "r", "chosen": "c", "rejected": "d"},
    RankingItem: {"prompt": "p", "responses": ["a", "b", "c"], "gold_scores": [1, 0.5, 3]},
    VerifiableProblem: {"prompt": "2+2?", "answer": "4", "id": "v"},
    JudgmentExample: {"prompt": "p", "response": "r", "label": True, "reference": "ref"},
}
# Required string fields (besides 'prompt', which may also be a message list).
REQUIRED_STR = {
    SFTRecord: ["response"],
    PreferencePair: ["chosen", "rejected"],
    PolarQuad: ["a1", "a2", "b1"],
    RankedTriple: ["reference", "chosen", "rejected"],
    RankingItem: [],
    VerifiableProblem: ["answer"],
    JudgmentExample: ["response"],
}
OPTIONAL_STR = {
    PreferencePair: ["subset"], PolarQuad: ["policy_a", "policy_b"], JudgmentExample: ["reference"],
}


def write_lines(path, lines: list[bytes | str]) -> None:
    data = b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in lines)
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def dump(row) -> str:
    return json.dumps(row, ensure_ascii=False)


def bad_cases(cls: type) -> list[tuple[str, object, str, str]]:
    """(field to set, bad value or DELETE, expected error field, expected kind) for `cls`."""
    cases = [
        ("prompt", DELETE, "prompt", "missing"),
        ("prompt", "", "prompt", "empty_string"),
        ("prompt", "  \n", "prompt", "empty_string"),
        ("prompt", 5, "prompt", "wrong_type"),
        ("prompt", None, "prompt", "wrong_type"),
        ("prompt", {"role": "user", "content": "x"}, "prompt", "wrong_type"),
        ("prompt", [], "prompt", "empty_list"),
        ("prompt", ["hi"], "prompt[0]", "bad_message"),
        ("prompt", [{"role": "user", "content": "a"}, {"role": "robot", "content": "x"}], "prompt[1].role", "bad_role"),
        ("prompt", [{"content": "x"}], "prompt[0].role", "missing"),
        ("prompt", [{"role": "user"}], "prompt[0].content", "missing"),
        ("prompt", [{"role": "user", "content": 3}], "prompt[0].content", "wrong_type"),
        ("prompt", [{"role": "user", "content": None}], "prompt[0].content", "wrong_type"),
    ]
    for f in REQUIRED_STR[cls]:
        cases += [
            (f, DELETE, f, "missing"),
            (f, "", f, "empty_string"),
            (f, " \t", f, "empty_string"),
            (f, 7, f, "wrong_type"),
            (f, None, f, "wrong_type"),
            (f, ["x"], f, "wrong_type"),
        ]
    for f in OPTIONAL_STR.get(cls, []):
        cases += [(f, 5, f, "wrong_type"), (f, "", f, "empty_string")]
    cases += [("id", True, "id", "wrong_type"), ("id", [1], "id", "wrong_type"), ("id", "", "id", "empty_string")]
    if cls is RankingItem:
        cases += [
            ("responses", DELETE, "responses", "missing"),
            ("responses", "abc", "responses", "wrong_type"),
            ("responses", ["only one"], "responses", "too_short"),
            ("responses", ["a", ""], "responses[1]", "empty_string"),
            ("responses", ["a", 2], "responses[1]", "wrong_type"),
            ("gold_scores", DELETE, "gold_scores", "missing"),
            ("gold_scores", [1, 2], "gold_scores", "length_mismatch"),
            ("gold_scores", [1, "2", 3], "gold_scores[1]", "wrong_type"),
            ("gold_scores", [1, True, 3], "gold_scores[1]", "wrong_type"),
            ("gold_scores", 3, "gold_scores", "wrong_type"),
        ]
    if cls is JudgmentExample:
        cases += [
            ("label", DELETE, "label", "missing"),
            ("label", "yes", "label", "wrong_type"),
            ("label", None, "label", "wrong_type"),
            ("label", [1], "label", "wrong_type"),
        ]
    return cases


DELETE = object()


def mutate(row: dict, field: str, value) -> dict:
    out = dict(row)
    if value is DELETE:
        out.pop(field, None)
    else:
        out[field] = value
    return out


ALL_BAD = [
    pytest.param(cls, *case, id=f"{cls.__name__}-{case[2]}-{case[3]}-{i}")
    for cls in GOOD
    for i, case in enumerate(bad_cases(cls))
]

# ---------------------------------------------------------------------------------------------
# errors.py
# ---------------------------------------------------------------------------------------------


def test_bad_row_error_text_attributes_and_pickle():
    err = BadRowError("data/train.jsonl", 17, "response", "expected a non-empty string, got ''", "empty_string")
    assert str(err) == "data/train.jsonl:17: field 'response': expected a non-empty string, got ''"
    assert (err.file, err.line, err.field, err.kind) == ("data/train.jsonl", 17, "response", "empty_string")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.field == "response" and back.kind == "empty_string"
    assert str(BadRowError("f.jsonl", 2, "<json>", "invalid JSON: x", "invalid_json")) == "f.jsonl:2: invalid JSON: x"
    assert BadRowError("f", 1, "prompt[3].role", "m", "bad_role").reason == "prompt[].role:bad_role"


def test_policy_and_stats():
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        BadRowPolicy("ignore")
    err = BadRowError("f", 1, "x", "m", "k")
    with pytest.raises(BadRowError):
        BadRowPolicy("error").bad(err)
    pol = BadRowPolicy("skip")
    pol.row_read(3)
    pol.bad(err)
    pol.bad(err)
    assert pol.stats.rows_ok == 1 and pol.stats.skipped_by_reason == {"x:k": 2}
    other = RowStats(rows_read=2)
    other.record_filtered("near_tie", 5)
    pol.stats.merge(other)
    assert pol.stats.as_metrics() == {
        "data/rows_read": 5, "data/rows_skipped": 2, "data/skipped/x:k": 2, "data/filtered/near_tie": 5,
    }
    assert "skipped 2 (x:k=2)" in str(pol.stats)


# ---------------------------------------------------------------------------------------------
# records.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(GOOD))
def test_good_rows_round_trip(cls):
    rec = cls.from_dict(GOOD[cls], file="x.jsonl", line=1)
    again = cls.from_dict(rec.to_dict(), file="x.jsonl", line=1)
    assert again == rec
    d = rec.to_dict()
    json.dumps(d)  # JSON-ready
    assert set(d) == {f.name for f in dataclasses.fields(cls)}
    if not isinstance(rec.prompt, str):
        assert isinstance(rec.prompt, tuple) and d["prompt"] == GOOD[cls]["prompt"]
    assert record_type_by_name(cls.__name__) is cls
    extra = dict(GOOD[cls], unrelated_column=[1, 2])  # unknown keys are ignored
    assert cls.from_dict(extra, file="x", line=1) == rec


def test_record_details():
    r = RankingItem.from_dict(GOOD[RankingItem], file="f", line=1)
    assert r.responses == ("a", "b", "c") and r.gold_scores == (1, 0.5, 3)
    j = JudgmentExample.from_dict({"prompt": "p", "response": "r", "label": 0.25}, file="f", line=1)
    assert j.label == 0.25 and j.reference is None and j.id is None
    assert RankingItem("p", ["a", "b"], [1, 2]).responses == ("a", "b")  # direct construction
    with pytest.raises(ValueError, match="unknown record type 'Nope'; valid:"):
        record_type_by_name("Nope")
    with pytest.raises(BadRowError, match=r"f:4: field 'label': expected a finite number, got nan"):
        JudgmentExample.from_dict({"prompt": "p", "response": "r", "label": math.nan}, file="f", line=4)
    with pytest.raises(BadRowError, match=r"f:9: expected a JSON object, got list \[1\]"):
        SFTRecord.from_dict([1], file="f", line=9)


@pytest.mark.parametrize("cls,field,value,want_field,want_kind", ALL_BAD)
def test_from_dict_bad_field(cls, field, value, want_field, want_kind):
    with pytest.raises(BadRowError) as info:
        cls.from_dict(mutate(GOOD[cls], field, value), file="data/train.jsonl", line=17)
    err = info.value
    assert (err.file, err.line, err.field, err.kind) == ("data/train.jsonl", 17, want_field, want_kind)
    assert str(err).startswith(f"data/train.jsonl:17: field '{want_field}': ")


@pytest.mark.parametrize("cls", list(GOOD))
def test_load_records_names_file_line_field_and_skips_exactly(tmp_path, cls):
    """One file per record type: good rows interleaved with every bad case (and blank lines)."""
    path = tmp_path / f"{cls.__name__}.jsonl"
    lines, good, bad_at = [], [], {}
    for i, (field, value, want_field, want_kind) in enumerate(bad_cases(cls)):
        g = dict(GOOD[cls], id=f"g{i}")
        lines.append(dump(g))
        good.append(cls.from_dict(g))
        if i % 3 == 0:
            lines.append("")  # blank: ignored, but counted in line numbers
        lines.append(dump(mutate(GOOD[cls], field, value)))
        bad_at[len(lines)] = (want_field, want_kind)
    lines += ["{not json", "[1, 2]"]
    bad_at[len(lines) - 1], bad_at[len(lines)] = ("<json>", "invalid_json"), ("<json>", "not_object")
    write_lines(path, lines)

    with pytest.raises(BadRowError) as info:
        load_records(path, cls)
    first = min(bad_at)
    assert info.value.line == first and info.value.file == str(path)
    assert str(info.value).startswith(f"{path}:{first}: field '{bad_at[first][0]}': ")

    records, stats = load_records(path, cls, on_bad_row="skip")
    assert records == good  # every good row, in order
    assert stats.rows_skipped == len(bad_at)
    assert stats.rows_read == len(good) + len(bad_at)
    assert [e.line for e in stats.first_errors] == sorted(bad_at)
    assert [(e.field, e.kind) for e in stats.first_errors] == [bad_at[k] for k in sorted(bad_at)]
    assert sum(stats.skipped_by_reason.values()) == len(bad_at)


# ---------------------------------------------------------------------------------------------
# read_jsonl and sources
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_read_jsonl_quirks(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    lines = [
        b'\xef\xbb\xbf{"a": 1}',          # 1: UTF-8 BOM on the first line is fine
        b"",                               # 2: blank
        b'{"a": 2}\r',                     # 3: CRLF
        b'{"a": 3',                        # 4: truncated
        b'{"a": 1, "a": 2}',               # 5: duplicate key
        b'"just a string"',                # 6: not an object
        b'{"a": "\xff"}',                  # 7: invalid UTF-8
        b"   ",                            # 8: blank
        b'{"a": NaN}',                     # 9: Python's json accepts NaN; records reject it later
    ]
    write_lines(path, lines)
    with pytest.raises(BadRowError, match=rf"^{path}:4: invalid JSON: Expecting "):
        list(read_jsonl(path))
    stats = RowStats()
    rows = list(read_jsonl(path, on_bad_row="skip", stats=stats))
    assert [ln for ln, _ in rows] == [1, 3, 9]
    assert [r["a"] for _, r in rows[:2]] == [1, 2]
    assert (stats.rows_read, stats.rows_skipped) == (7, 4)
    assert stats.skipped_by_reason == {
        "<json>:invalid_json": 1, "<json>:duplicate_key": 1, "<json>:not_object": 1, "<json>:invalid_utf8": 1,
    }


def test_corrupt_gzip_is_a_file_error(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-30])
    with pytest.raises(ValueError, match="x.jsonl.gz: unreadable after line"):
        list(read_jsonl(path, on_bad_row="skip"))
    with pytest.raises(ValueError, match="unsupported data source"):
        load_records(tmp_path / "x.txt", SFTRecord) if (tmp_path / "x.txt").write_text("{}") else None


def test_field_map(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_lines(path, [
        dump({"question": "q1", "solution": "s1"}),
        dump({"question": "", "solution": "s2"}),
        dump({"solution": "s3"}),
        dump({"question": "q4", "prompt": "p4", "solution": "s4"}),
        dump({"question": [{"role": "user", "content": 1}], "solution": "s5"}),
    ])
    fm = {"question": "prompt", "solution": "response"}
    recs, stats = load_records(path, "SFTRecord", field_map=fm, on_bad_row="skip")
    assert recs == [SFTRecord("q1", "s1")]
    msgs = [str(e) for e in stats.first_errors]
    assert msgs == [
        f"{path}:2: field 'question': expected a non-empty string, got '' (field_map: 'question' -> 'prompt')",
        f"{path}:3: field 'question': required field is missing (field_map: 'question' -> 'prompt')",
        f"{path}:4: field 'question': field_map renames 'question' to 'prompt' but the row already has 'prompt'",
        f"{path}:5: field 'question[0].content': expected a string, got int 1 (field_map: 'question' -> 'prompt')",
    ]
    with pytest.raises(ValueError, match="SFTRecord has no field 'answer'"):
        load_records(path, SFTRecord, field_map={"question": "answer"})


def test_parquet_and_hf_dataset_dir(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "p1", "chosen": "c", "rejected": "r"},
        {"prompt": "p2", "chosen": "", "rejected": "r"},
        {"prompt": "p3", "chosen": "c", "rejected": "r"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    with pytest.raises(BadRowError, match=r"prefs.parquet:2: field 'chosen': expected a non-empty string"):
        load_records(tmp_path / "prefs.parquet", PreferencePair)
    recs, stats = load_records(tmp_path / "prefs.parquet", PreferencePair, on_bad_row="skip")
    assert [r.prompt for r in recs] == ["p1", "p3"] and stats.rows_skipped == 1

    datasets = pytest.importorskip("datasets")
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "response": "yo"}] * 2
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat)}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"DatasetDict; pass split= one of \['train'\]"):
        load_records(tmp_path / "hf", SFTRecord)
    recs, stats = load_records(tmp_path / "hf", SFTRecord, split="train")
    assert recs == [SFTRecord(({"role": "user", "content": "hi"},), "yo")] * 2 and stats.rows_read == 2


def test_write_jsonl_round_trip(tmp_path):
    recs = [SFTRecord.from_dict(GOOD[SFTRecord]), SFTRecord(tuple(MSGS), "r", id=2)]
    assert write_jsonl(tmp_path / "o.jsonl.gz", recs) == 2
    assert list(iter_records(tmp_path / "o.jsonl.gz", SFTRecord)) == recs


# ---------------------------------------------------------------------------------------------
# HH-RLHF
# ---------------------------------------------------------------------------------------------


def hh(*turns: str, final: str) -> str:
    text = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))
    return text + "\n\nAssistant:" + final


def test_hh_rlhf_parsing(tmp_path):
    path = tmp_path / "hh.jsonl"
    ok = {"chosen": hh("Hi", "Hello", "Joke?", final=" Sure: ..."), "rejected": hh("Hi", "Hello", "Joke?", final=" No.")}
    fake_turn = {  # the chosen response itself contains a (model-written) turn marker
        "chosen": hh("Q", final=" A1.  Human: more?\n\nAssistant: ok"),
        "rejected": hh("Q", final=" A2"),
    }
    rows = [
        ok,                                                                   # 1
        fake_turn,                                                            # 2
        {"chosen": hh("Q", final=" "), "rejected": hh("Q", final=" x")},      # 3 empty chosen
        {"chosen": hh("Q", final=" x"), "rejected": hh("Q", final="")},       # 4 empty rejected
        {"chosen": "\n\nHuman: Q only", "rejected": hh("Q", final=" x")},     # 5 no Assistant turn
        {"chosen": hh("Q1", final=" x"), "rejected": hh("Q2", final=" y")},   # 6 different prompts
        {"chosen": "junk" + hh("Q", final=" x"), "rejected": "junk" + hh("Q", final=" y")},  # 7
        {"chosen": hh("Q", final=" x")},                                      # 8 missing rejected
        {"chosen": hh("Q", final=" x"), "rejected": 3},                       # 9
    ]
    write_lines(path, [dump(r) for r in rows])
    with pytest.raises(BadRowError) as info:
        load_hh_rlhf(path)
    assert str(info.value) == f"{path}:3: field 'chosen': final assistant turn is empty (got ' ')"
    pairs, stats = load_hh_rlhf(path, on_bad_row="skip", subset="harmless-base")
    assert [(e.line, e.field, e.kind) for e in stats.first_errors] == [
        (3, "chosen", "empty_response"), (4, "rejected", "empty_response"), (5, "chosen", "bad_transcript"),
        (6, "rejected", "no_common_prompt"), (7, "chosen", "bad_transcript"), (8, "rejected", "missing"),
        (9, "rejected", "wrong_type"),
    ]
    assert len(pairs) == 2 and stats.rows_read == 9
    p = pairs[0]
    assert p.prompt == (
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Joke?"},
    )
    assert (p.chosen, p.rejected, p.subset, p.id) == ("Sure: ...", "No.", "harmless-base", "hh:1")
    assert pairs[1].prompt == ({"role": "user", "content": "Q"},)
    assert pairs[1].chosen == "A1.  Human: more?\n\nAssistant: ok" and pairs[1].rejected == "A2"

    text_pairs, _ = load_hh_rlhf(path, on_bad_row="skip", prompt_format="text", allow_empty_response=True)
    # rows 1-4 and 7 parse in text format (7: leading junk is fine for raw text)
    assert [t.id for t in text_pairs] == ["hh:1", "hh:2", "hh:3", "hh:4", "hh:7"]
    for t, i in zip(text_pairs, [0, 1, 2, 3, 6]):
        assert t.prompt + t.chosen == rows[i]["chosen"] and t.prompt + t.rejected == rows[i]["rejected"]
        assert t.prompt.endswith("\n\nAssistant:")


def test_split_hh_pair_uses_last_common_marker():
    a = hh("Q", "A", "Q2", final=" same start, then one")
    b = hh("Q", "A", "Q2", final=" same start, then two")
    assert a[: split_hh_pair(a, b)] == hh("Q", "A", "Q2", final="")
    assert split_hh_pair("\n\nHuman: x", "\n\nHuman: y") is None


# ---------------------------------------------------------------------------------------------
# AlpacaEval
# ---------------------------------------------------------------------------------------------


def _alpaca_files(tmp_path, extra_outputs=(), extra_annotations=()):
    outs, anns = [], []
    gens = ["base", "g1", "g2", "g3"]
    prefs = {0: {"g1": 1.9, "g2": 1.2, "g3": 1.25}, 1: {"g1": 1.5, "g2": 1.5, "g3": 1.0}}
    for i in (0, 1):
        for g in gens:
            outs.append({"id": i, "dataset": "d", "instruction": f"instr {i}", "generator": g, "output": f"{g} says {i}"})
        anns.append({"id": i, "generator": "base", "baseline": "base", "preference": 1.5})
        for g, p in prefs[i].items():
            anns.append({"id": i, "generator": g, "baseline": "base", "preference": p})
    outs += list(extra_outputs)
    anns += list(extra_annotations)
    write_lines(tmp_path / "outputs.jsonl", [dump(r) for r in outs])
    write_lines(tmp_path / "annotations.jsonl.gz", [dump(r) for r in anns])
    return tmp_path / "outputs.jsonl", tmp_path / "annotations.jsonl.gz", len(outs), len(anns)


def test_alpaca_eval_triples(tmp_path):
    o, a, n_out, n_ann = _alpaca_files(tmp_path)
    triples, stats = load_alpaca_eval_triples(o, a, baseline="base", min_gap=0.1)
    # id 0: g1(1.9) > g2(1.2), g1 > g3(1.25); g2 vs g3 is a near-tie. id 1: g1 = g2 tie; g1 > g3; g2 > g3.
    assert [t.id for t in triples] == ["0:g1>g2", "0:g1>g3", "1:g1>g3", "1:g2>g3"]
    t = triples[0]
    assert (t.prompt, t.reference, t.chosen, t.rejected) == ("instr 0", "base says 0", "g1 says 0", "g2 says 0")
    assert stats.filtered_by_reason == {"annotation_baseline_vs_itself": 2, "pair_near_tie": 2}
    assert stats.rows_read == n_out + n_ann and stats.rows_skipped == 0
    few, _ = load_alpaca_eval_triples(o, a, baseline="base", min_gap=0.0, generators=["g2", "g3"])
    assert [t.id for t in few] == ["0:g3>g2", "1:g2>g3"]
    none, st2 = load_alpaca_eval_triples(o, a, baseline="other")
    assert none == [] and st2.filtered_by_reason == {"annotation_other_baseline": 8}
    with pytest.raises(ValueError, match="min_gap"):
        load_alpaca_eval_triples(o, a, min_gap=-1)
    grouped, _ = load_alpaca_eval_outputs(o)
    assert list(grouped) == [0, 1] and list(grouped[0].outputs) == ["base", "g1", "g2", "g3"]


def test_alpaca_eval_bad_rows(tmp_path):
    bad_out = [
        {"id": 0, "dataset": "d", "instruction": "instr 0", "generator": "g1", "output": "again"},   # duplicate
        {"id": 0, "dataset": "d", "instruction": "changed", "generator": "g9", "output": "x"},      # conflict
        {"id": 5, "dataset": "d", "instruction": "i5", "generator": "g1", "output": ""},            # empty
        {"id": 6, "dataset": "d", "instruction": "i6", "generator": "g1", "output": "only g1"},
    ]
    bad_ann = [
        {"id": 0, "generator": "g1", "baseline": "base", "preference": 1.1},      # duplicate
        {"id": 0, "generator": "g4", "baseline": "base", "preference": None},     # null preference
        {"id": 0, "generator": "g4", "baseline": "base", "preference": 2.5},      # out of range
        {"id": 0, "generator": "g4", "baseline": "base", "preference": "1.7"},    # string
        {"id": 99, "generator": "g1", "baseline": "base", "preference": 1.7},     # unknown id
        {"id": 0, "generator": "g7", "baseline": "base", "preference": 1.7},      # no output of g7
        {"id": 6, "generator": "g1", "baseline": "base", "preference": 1.7},      # no baseline output
    ]
    o, a, n_out, n_ann = _alpaca_files(tmp_path, bad_out, bad_ann)
    with pytest.raises(BadRowError, match=rf"{o}:9: field 'generator': second output of 'g1' for id 0"):
        load_alpaca_eval_triples(o, a, baseline="base")
    triples, stats = load_alpaca_eval_triples(o, a, baseline="base", on_bad_row="skip")
    assert [t.id for t in triples] == ["0:g1>g2", "0:g1>g3", "1:g1>g3", "1:g2>g3"]  # unchanged
    got = [(e.file.endswith("outputs.jsonl"), e.line, e.field, e.kind) for e in stats.first_errors]
    assert got == [
        (True, 9, "generator", "duplicate"), (True, 10, "instruction", "conflict"), (True, 11, "output", "empty_string"),
        (False, 9, "generator", "duplicate"), (False, 10, "preference", "wrong_type"),
        (False, 11, "preference", "out_of_range"), (False, 12, "preference", "wrong_type"),
        (False, 13, "id", "unknown_id"), (False, 14, "generator", "missing_output"),
        (False, 15, "baseline", "missing_output"),
    ]
    assert stats.rows_read == n_out + n_ann and stats.rows_skipped == 10
    anns, st = load_alpaca_eval_annotations(a, on_bad_row="skip")
    assert len(anns) == n_ann - 4 and st.rows_skipped == 4


# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------


def test_gsm8k(tmp_path):
    path = tmp_path / "train.jsonl"
    write_lines(path, [
        dump({"question": "q1", "answer": "step <<1+1=2>>2\n#### 2"}),
        dump({"question": "q2", "answer": "big\n#### 1,080"}),
        dump({"question": "q3", "answer": "no marker 5"}),
        dump({"question": "q4", "answer": "#### 1\n#### 2"}),
        dump({"question": "", "answer": "#### 3"}),
        dump({"question": "q6", "answer": "x\n####   "}),
        dump({"question": "q7", "answer": "x\n#### -0.5"}),
    ])
    with pytest.raises(BadRowError, match=rf"{path}:3: field 'answer': expected exactly one '#### <answer>' line"):
        load_gsm8k(path)
    probs, stats = load_gsm8k(path, on_bad_row="skip")
    assert [(p.prompt, p.answer, p.id) for p in probs] == [("q1", "2", "train:1"), ("q2", "1080", "train:2"), ("q7", "-0.5", "train:7")]
    assert [(e.line, e.field) for e in stats.first_errors] == [(3, "answer"), (4, "answer"), (5, "question"), (6, "answer")]
    assert load_gsm8k(path, on_bad_row="skip", strip_commas=False)[0][1].answer == "1,080"


def test_gsm8k_solutions(tmp_path, monkeypatch):
    path = tmp_path / "example_model_solutions.jsonl.gz"
    pol = ["6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"]

    def row(**over):
        r = {"question": "q", "ground_truth": "gt\nA: 2"}
        for i, p in enumerate(pol):
            r[p] = {"is_correct": i % 2 == 0, "solution": f"sol {p}\nA: {i}"}
        r["6b_verification"] = repr(r["6b_verification"])  # Python repr string form
        r.update(over)
        return r

    import builtins

    called = []
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: called.append(a))  # must never be used
    write_lines(path, [
        dump(row()),
        dump(row(**{"175b_finetuning": "__import__('os').system('echo pwned')"})),
        dump(row(**{"6b_finetuning": "{'is_correct': 'yes', 'solution': 's'}"})),
        dump(row(**{"6b_finetuning": {"is_correct": True}})),
        dump(row(**{"6b_finetuning": {"is_correct": True, "solution": ""}})),
        dump({k: v for k, v in row().items() if k != "175b_verification"}),
        dump(row(**{"6b_finetuning": '{"is_correct": true, "solution": "json form"}'})),
        dump(row(**{"6b_finetuning": [1, 2]})),
    ])
    with pytest.raises(BadRowError, match=rf"{path}:2: field '175b_finetuning': expected a dict or its Python repr"):
        load_gsm8k_solutions(path)
    ex, stats = load_gsm8k_solutions(path, on_bad_row="skip")
    assert not called
    assert [(e.line, e.field, e.kind) for e in stats.first_errors] == [
        (2, "175b_finetuning", "bad_literal"), (3, "6b_finetuning.is_correct", "wrong_type"),
        (4, "6b_finetuning.solution", "missing"), (5, "6b_finetuning.solution", "empty_string"),
        (6, "175b_verification", "missing"), (8, "6b_finetuning", "wrong_type"),
    ]
    assert len(ex) == 8 and stats.rows_read == 8 and stats.rows_skipped == 6
    first = ex[:4]
    assert [e.id for e in first] == [f"example_model_solutions:1:{p}" for p in pol]
    assert [e.label for e in first] == [True, False, True, False]
    assert all(e.reference == "gt\nA: 2" and e.prompt == "q" for e in first)
    assert first[1].response == "sol 6b_verification\nA: 1"
    assert ex[4].response == "json form"


# ---------------------------------------------------------------------------------------------
# MATH (competition format: gold = the solution's last \boxed{})
# ---------------------------------------------------------------------------------------------


def _math_row(solution, **over):
    row = {"problem": "Compute it.", "level": "Level 3", "type": "Algebra", "solution": solution}
    row.update(over)
    return row


def _math_file(tmp_path):
    path = tmp_path / "math_test.jsonl"
    write_lines(path, [
        dump(_math_row(r"Dividing, $x = \frac{3}{6} = \boxed{\frac{1}{2}}$.")),
        dump(_math_row(r"First $\boxed{3}$ is a guess; in fact $y = \boxed{3\sqrt{3}}$.", type="Geometry")),
        dump(_math_row(r"The roots are $\boxed{\{1, 2\}}$.")),
        dump(_math_row(r"So $A = \boxed{\begin{pmatrix} 1 \\ -2 \end{pmatrix}}$.", type="Precalculus")),
        dump(_math_row(r"Hence the total is $\fbox{\$18.90}$.")),
        dump(_math_row(r"The answer is $\boxed 5$.")),
        dump(_math_row(r"We get $x = 4$, no box.")),                                   # 7: no final answer
        dump(_math_row(r"Then $\boxed{\frac{1}{2}$.")),                                 # 8: never closed
        dump(_math_row(r"\boxed{2}", problem="")),                                      # 9: empty problem
        dump({"problem": "Find x.", "solution": r"... $\boxed{\frac{14}{3}}$", "answer": r"\frac{14}{3}",
              "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1.json"}),  # MATH-500 schema
        dump({"problem": "AIME: find n.", "answer": 204}),                              # int answer, no solution
        dump({"problem": "No gold."}),                                                  # 12: neither field
        dump({"problem": "p", "answer": ["1"]}),                                        # 13: answer not a string
    ])
    return path


MATH_GOLD = [r"\frac{1}{2}", r"3\sqrt{3}", r"\{1, 2\}", r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", r"\$18.90", "5",
             r"\frac{14}{3}", "204"]


def test_math(tmp_path):
    path = _math_file(tmp_path)
    with pytest.raises(BadRowError, match=rf"{path}:7: field 'solution': expected a closed, non-empty \\boxed"):
        load_math(path)
    probs, stats = load_math(path, on_bad_row="skip")
    assert [p.answer for p in probs] == MATH_GOLD
    assert [p.id for p in probs] == [f"math_test:{i}" for i in (1, 2, 3, 4, 5, 6, 10, 11)]
    assert probs[0].prompt == "Compute it." and probs[-1].prompt == "AIME: find n."
    assert [(e.line, e.field, e.kind) for e in stats.first_errors] == [
        (7, "solution", "no_final_answer"), (8, "solution", "no_final_answer"), (9, "problem", "empty_string"),
        (12, "solution", "missing"), (13, "answer", "wrong_type"),
    ]
    assert stats.rows_read == 13 and stats.rows_skipped == 5
    assert extract_boxed_answer(r"$\boxed{}$") is None and extract_boxed_answer("no box") is None


def test_verifiable_sources(tmp_path):
    """`math:<path>` / `gsm8k:<path>` next to a plain {prompt, answer} file, in RL tasks and SFT."""
    from types import SimpleNamespace

    from jaxrl_rm.config import TaskSpec
    from jaxrl_rm.rewards import MathVerifier
    from jaxrl_rm.train.sft import load_sft_records
    from jaxrl_rm.train.tasks import load_task_items

    path = _math_file(tmp_path)
    assert problem_format(f"math:{path}") == "math" and problem_format(str(path)) is None
    probs, stats = load_verifiable(f"math:{path}", on_bad_row="skip")
    assert [p.answer for p in probs] == MATH_GOLD and stats.rows_skipped == 5
    gsm = tmp_path / "gsm.jsonl"
    write_lines(gsm, [dump({"question": "q1", "answer": "2 + 2 = 4\n#### 4"})])
    assert [(p.prompt, p.answer) for p in load_verifiable(f"gsm8k:{gsm}")[0]] == [("q1", "4")]
    plain = tmp_path / "plain.jsonl"
    write_lines(plain, [dump({"question": "q", "gold": "7"})])
    assert load_verifiable(plain, field_map={"question": "prompt", "gold": "answer"})[0][0].answer == "7"
    with pytest.raises(ValueError, match="field_map does not apply to a math: source"):
        load_verifiable(f"math:{path}", field_map={"question": "problem"})

    task = TaskSpec(name="math", kind="verifiable", data=f"math:{path}", options={"on_bad_row": "skip"})
    items = load_task_items(task, split="train", seed=0, size=8)
    assert [it.answer for it in items] == MATH_GOLD and items[1].prompt == "Compute it."
    records, counts = load_sft_records(f"math:{path}", SimpleNamespace(data=SimpleNamespace(on_bad_row="skip")),
                                       seed=0, split="train")
    assert [r.response for r in records] == MATH_GOLD and counts["rows_skipped"] == 5

    # the golds a MATH file yields verify the forms models answer in, and reject prefixes of themselves
    responses = [r"The answer is $\boxed{0.5}$.", r"$\boxed{\sqrt{27}}$", r"\boxed{\{2, 1\}}",
                 r"\boxed{\begin{pmatrix}1\\-2\end{pmatrix}}", "#### 18.90", "The answer is 5.",
                 r"\boxed{\dfrac{14}{3}}", "#### 204"]
    out = MathVerifier(backend="inline")(responses, [it.answer for it in items])
    assert out.rewards.tolist() == [1.0] * len(items), [r.reason for r in out.results]
    wrong = MathVerifier(backend="inline")([r"\boxed{3}", r"\boxed{\frac{14}{4}}"], [items[1].answer, items[6].answer])
    assert wrong.rewards.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Fuzz: malformed rows mixed with good rows
# ---------------------------------------------------------------------------------------------

_TEXT = st.text(min_size=1, max_size=12).filter(lambda s: s.strip())
_MSG = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=8)})
_PROMPT = st.one_of(_TEXT, st.lists(_MSG, min_size=1, max_size=3))
_ID = st.one_of(st.none(), _TEXT, st.integers(-5, 10**6))


def _good_row_strategy(cls):
    fields = {"prompt": _PROMPT, "id": _ID}
    for f in REQUIRED_STR[cls]:
        fields[f] = _TEXT
    for f in OPTIONAL_STR.get(cls, []):
        fields[f] = st.one_of(st.none(), _TEXT)
    if cls is RankingItem:
        return st.integers(2, 4).flatmap(lambda n: st.fixed_dictionaries(dict(
            fields, responses=st.lists(_TEXT, min_size=n, max_size=n),
            gold_scores=st.lists(st.floats(-10, 10, allow_nan=False), min_size=n, max_size=n))))
    if cls is JudgmentExample:
        fields["label"] = st.one_of(st.booleans(), st.integers(-3, 3), st.floats(0, 1))
    return st.fixed_dictionaries(fields)


_NOT_STR = st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(_TEXT, st.integers(), max_size=1))
_BAD_MSGS = st.one_of(
    st.just([]),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), min_size=1, max_size=2),
    st.lists(st.fixed_dictionaries({"role": _TEXT.filter(lambda r: r not in ("system", "user", "assistant")), "content": st.text(max_size=3)}), min_size=1, max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": _NOT_STR}), min_size=1, max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.just("user")}), min_size=1, max_size=2),
)


@st.composite
def _bad_line(draw, cls, good_row):
    """A JSONL line (bytes) that is guaranteed to be a bad row for `cls`."""
    required = ["prompt", *REQUIRED_STR[cls]] + (["responses", "gold_scores"] if cls is RankingItem else []) + (["label"] if cls is JudgmentExample else [])
    str_fields = ["prompt", *REQUIRED_STR[cls]]
    kind = draw(st.sampled_from(["truncated", "junk", "not_object", "missing", "wrong_type", "empty", "messages", "dup_key", "utf8"]))
    text = dump(good_row)
    if kind == "truncated":
        return text[: draw(st.integers(1, len(text) - 1))].encode()  # a proper prefix of {...}
    if kind == "junk":
        return draw(st.sampled_from([b"nope", b"{'single': 'quotes'}", b"{,}", b"}{", b'{"a": 1,}', b"[", b"\x00"]))
    if kind == "not_object":
        return dump(draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none()))).encode()
    if kind == "dup_key":
        return ('{"prompt": "dup", ' + text[1:]).encode()
    if kind == "utf8":
        return b'{"prompt": "\xff\xfe"}'
    row = dict(good_row)
    if kind == "missing":
        del row[draw(st.sampled_from(required))]
    elif kind == "wrong_type":
        f = draw(st.sampled_from(str_fields))
        row[f] = draw(_NOT_STR)  # for 'prompt' a list of ints / [] is a bad message list
    elif kind == "empty":
        row[draw(st.sampled_from(str_fields))] = draw(st.sampled_from(["", " ", "\n\t"]))
    else:
        row["prompt"] = draw(_BAD_MSGS)
    return dump(row).encode()


@st.composite
def _file_plan(draw):
    """(record type, shuffled lines): 26-40 bad rows, 0-20 good rows, 0-5 blank lines."""
    cls = draw(st.sampled_from(list(GOOD)))
    goods = draw(st.lists(_good_row_strategy(cls), min_size=0, max_size=20))
    bases = goods or [draw(_good_row_strategy(cls))]
    bads = [draw(_bad_line(cls, draw(st.sampled_from(bases)))) for _ in range(draw(st.integers(26, 40)))]
    plan = [(dump(g).encode(), g) for g in goods] + [(b, None) for b in bads]
    plan += [(b"  ", "blank")] * draw(st.integers(0, 5))
    return cls, draw(st.permutations(plan))


_FUZZ_EXAMPLES = 40  # x >= 26 bad rows each: more than 1000 malformed rows per run


def test_fuzz_only_bad_row_errors_and_exact_counts(tmp_path_factory):
    n_bad_total = [0]

    @settings(max_examples=_FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_file_plan())
    def check(cls_plan):
        cls, plan = cls_plan
        path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line, _ in plan))
        bad_lines = [i + 1 for i, (_, g) in enumerate(plan) if g is None]
        good = [cls.from_dict(g) for _, g in plan if isinstance(g, dict)]
        n_bad_total[0] += len(bad_lines)

        with pytest.raises(BadRowError) as info:  # any other exception fails the test
            load_records(path, cls)
        assert info.value.line == bad_lines[0] and str(info.value).startswith(f"{path}:{bad_lines[0]}: ")
        records, stats = load_records(path, cls, on_bad_row="skip")
        assert records == good  # every good row, in order
        assert stats.rows_skipped == len(bad_lines)
        assert stats.rows_read == len(good) + len(bad_lines)
        assert [e.line for e in stats.first_errors] == bad_lines

    check()
    assert n_bad_total[0] >= 1000


def test_thousand_malformed_rows(tmp_path):
    """1000 malformed rows of every kind interleaved with 1000 good rows, all record types."""
    rng = random.Random(0)
    kinds = ["truncated", "not_object", "missing", "wrong_type", "empty", "messages", "dup_key", "utf8"]
    classes = list(GOOD)
    total_bad = 0
    for k, cls in enumerate(classes):
        n_bad = 1000 // len(classes) + (1 if k < 1000 % len(classes) else 0)
        lines, good, bad_lines = [], [], []
        for i in range(n_bad):
            g = dict(GOOD[cls], id=f"{cls.__name__}-{i}")
            lines.append(dump(g).encode())
            good.append(cls.from_dict(g))
            row, kind = dict(g), kinds[(i + k) % len(kinds)]
            if kind == "truncated":
                line = dump(row)[: rng.randint(1, len(dump(row)) - 1)].encode()
            elif kind == "not_object":
                line = rng.choice([b"1", b'"s"', b"[]", b"null", b"true"])
            elif kind == "dup_key":
                line = ('{"id": 0, ' + dump(row)[1:]).encode()
            elif kind == "utf8":
                line = b'{"prompt": "\xc3\x28"}'
            else:
                field = rng.choice(["prompt", *REQUIRED_STR[cls]])
                if kind == "missing":
                    del row[field]
                elif kind == "wrong_type":
                    row[field] = rng.choice([0, 1.5, None, True, {"a": 1}])
                elif kind == "empty":
                    row[field] = rng.choice(["", "   "])
                else:
                    row["prompt"] = rng.choice([[], [{"role": "bot", "content": "x"}], [{"role": "user"}], [["user", "x"]]])
                line = dump(row).encode()
            lines.append(line)
            bad_lines.append(len(lines))
        path = tmp_path / f"{cls.__name__}.jsonl.gz"
        write_lines(path, lines)
        with pytest.raises(BadRowError) as info:
            load_records(path, cls)
        assert info.value.line == bad_lines[0]
        records, stats = load_records(path, cls, on_bad_row="skip")
        assert records == good and stats.rows_skipped == n_bad and stats.rows_read == 2 * n_bad
        assert [e.line for e in stats.first_errors] == bad_lines[:100]
        total_bad += n_bad
    assert total_bad == 1000


def test_all_record_types_covered():
    assert set(GOOD) == set(RECORD_TYPES.values())
