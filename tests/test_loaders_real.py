"""Loaders on the real public data in ../shared/data (see its README): every row parses, and the
real quirks are pinned down by line number so a change in behaviour is visible."""

from __future__ import annotations

import collections
import gzip
import json
import re

import pytest

from jaxrl_rm.data.errors import BadRowError
from jaxrl_rm.data.loaders import (
    HH_ASSISTANT,
    load_alpaca_eval_annotations,
    load_alpaca_eval_outputs,
    load_alpaca_eval_triples,
    load_gsm8k,
    load_gsm8k_solutions,
    load_hh_rlhf,
)
from jaxrl_rm.data.records import PreferencePair

HH_ROWS = 2312
# Real HH-RLHF harmless-base test rows whose *chosen* final assistant turn is empty (the labeller
# preferred silence): bad rows by default (kind empty_response), kept with allow_empty_response.
HH_EMPTY_CHOSEN_LINES = [87, 517, 926, 1104]
# Rows whose final response itself contains a "\n\nHuman:"/"\n\nAssistant:" marker: the model
# wrote a fake turn. The prompt is the last marker common to both transcripts, so they parse.
HH_MARKER_IN_RESPONSE = {1255: "chosen", 1689: "chosen", 1951: "rejected", 1953: "chosen", 2037: "chosen"}
# Rows whose prompt has two consecutive assistant turns (kept as two messages).
HH_CONSECUTIVE_ASSISTANT = [668, 764, 1320, 1850]


@pytest.fixture(scope="module")
def hh_path(shared_data):
    return shared_data / "hh_rlhf" / "harmless_base_test.jsonl.gz"


@pytest.fixture(scope="module")
def alpaca(shared_data):
    d = shared_data / "alpaca_eval"
    return d / "outputs.jsonl.gz", d / "annotations.jsonl.gz"


def test_hh_rlhf_every_row(hh_path):
    raw = [json.loads(line) for line in gzip.open(hh_path, "rt", encoding="utf-8")]
    assert len(raw) == HH_ROWS

    # Default: the 4 empty-chosen rows are the only bad rows, named by line and field.
    with pytest.raises(BadRowError) as info:
        load_hh_rlhf(hh_path)
    assert str(info.value) == f"{hh_path}:87: field 'chosen': final assistant turn is empty (got ' ')"
    pairs, stats = load_hh_rlhf(hh_path, on_bad_row="skip")
    assert [(e.line, e.field, e.kind) for e in stats.first_errors] == [
        (ln, "chosen", "empty_response") for ln in HH_EMPTY_CHOSEN_LINES
    ]
    assert (stats.rows_read, stats.rows_skipped, len(pairs)) == (HH_ROWS, 4, HH_ROWS - 4)

    # With allow_empty_response every row parses, in both prompt formats.
    pairs, stats = load_hh_rlhf(hh_path, allow_empty_response=True, subset="harmless-base")
    assert len(pairs) == HH_ROWS and stats.rows_skipped == 0
    texts, _ = load_hh_rlhf(hh_path, allow_empty_response=True, prompt_format="text")
    assert len(texts) == HH_ROWS

    marker = re.compile(r"\n\n(Human|Assistant):")
    consecutive, in_response = [], {}
    for line, (p, t, r) in enumerate(zip(pairs, texts, raw), start=1):
        assert isinstance(p, PreferencePair) and p.id == f"harmless_base_test:{line}"
        # text format: prompt + response reproduces each transcript exactly
        assert t.prompt + t.chosen == r["chosen"] and t.prompt + t.rejected == r["rejected"]
        assert t.prompt.endswith(HH_ASSISTANT)
        # messages format: user turn last, same text as the raw prompt modulo whitespace
        assert p.prompt[-1]["role"] == "user" and p.prompt[0]["role"] == "user"
        rendered = "".join(
            f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in p.prompt
        )
        assert rendered.split() == t.prompt[: -len(HH_ASSISTANT)].split()
        assert (p.chosen, p.rejected) == (t.chosen.strip(), t.rejected.strip())
        roles = [m["role"] for m in p.prompt]
        if any(a == b == "assistant" for a, b in zip(roles, roles[1:])):
            consecutive.append(line)
        for field in ("chosen", "rejected"):
            if marker.search(getattr(t, field)):
                in_response[line] = field
    assert consecutive == HH_CONSECUTIVE_ASSISTANT
    assert in_response == HH_MARKER_IN_RESPONSE
    assert [i + 1 for i, p in enumerate(pairs) if not p.chosen] == HH_EMPTY_CHOSEN_LINES
    assert all(p.rejected for p in pairs)


def test_alpaca_eval_every_row_and_triples(alpaca):
    outputs_path, annotations_path = alpaca
    anns, st = load_alpaca_eval_annotations(annotations_path)
    assert len(anns) == 7241 and st.rows_skipped == 0
    assert all(1.0 <= a.preference <= 2.0 and a.baseline == "gpt4_1106_preview" for a in anns)

    grouped, st = load_alpaca_eval_outputs(outputs_path)
    assert (st.rows_read, st.rows_skipped, len(grouped)) == (22535, 0, 805)
    assert sum(len(g.outputs) for g in grouped.values()) == 22535
    assert list(grouped) == list(range(805))
    # 28 generators; phi-2 and text_davinci_001 lack 2 answers each, llama-2-70b-chat-hf 1.
    sizes = collections.Counter(len(g.outputs) for g in grouped.values())
    assert sizes == {28: 800, 27: 5}

    triples, stats = load_alpaca_eval_triples(outputs_path, annotations_path)
    # 8 non-baseline judged generators -> C(8, 2) pairs per instruction (fewer where phi-2 or
    # text_davinci_001 are missing): 22512 pairs, of which 20191 are closer than min_gap=0.1
    # (the strong baseline wins most comparisons, so most preferences sit near 1.0).
    assert len(triples) == 2321
    assert stats.rows_skipped == 0 and stats.rows_read == 22535 + 7241
    assert stats.filtered_by_reason == {"annotation_baseline_vs_itself": 805, "pair_near_tie": 20191}
    pref = {(a.id, a.generator): a.preference for a in anns}
    keys = []
    for t in triples:
        rid, pair = t.id.split(":", 1)
        hi, lo = pair.split(">")
        rid = int(rid)
        assert pref[rid, hi] - pref[rid, lo] >= 0.1
        g = grouped[rid]
        assert (t.prompt, t.reference, t.chosen, t.rejected) == (
            g.instruction, g.outputs["gpt4_1106_preview"], g.outputs[hi], g.outputs[lo],
        )
        keys.append((rid, min(hi, lo), max(hi, lo)))
    assert keys == sorted(keys)  # deterministic order: instruction id, then generator names
    assert len({k[0] for k in keys}) == 211  # instructions with at least one triple


def test_gsm8k_every_row(shared_data):
    d = shared_data / "gsm8k"
    number = re.compile(r"-?\d+(\.\d+)?")
    for name, n in (("train.jsonl.gz", 7473), ("test.jsonl", 1319)):
        probs, st = load_gsm8k(d / name)
        assert len(probs) == n and st.rows_read == n and st.rows_skipped == 0
        assert all(number.fullmatch(p.answer) for p in probs)  # thousands separators removed
    probs, _ = load_gsm8k(d / "test.jsonl", strip_commas=False)
    assert sum("," in p.answer for p in probs) == 14

    examples, st = load_gsm8k_solutions(d / "example_model_solutions.jsonl.gz")
    assert (st.rows_read, st.rows_skipped, len(examples)) == (1319, 0, 4 * 1319)
    assert all(isinstance(e.label, bool) and e.reference for e in examples)
    labels = collections.Counter((e.id.rsplit(":", 1)[1], e.label) for e in examples)
    assert sum(v for (_, lab), v in labels.items() if lab) == 2001
    test_questions = [p.prompt for p in probs]
    assert [e.prompt for e in examples[::4]] == test_questions  # same problems, same order
