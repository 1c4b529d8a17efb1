"""Quoted numbers (`python -m jaxrl_rm.quotes`): regenerated from run directories, stale ones fail the check."""

import json

import pytest

from conftest import REPO
from jaxrl_rm.quotes import format_value, main, markdown_table, quotes_of

DOC = """# Doc
RLVR takes it from <!-- q rlvr accuracy_before {pct:.1f} % -->27.7 %<!-- /q --> to \
<!-- q rlvr accuracy_after {pct:.1f} % -->45.3 %<!-- /q --> (gain <!-- q rlvr accuracy_gain +.3f -->+0.176<!-- /q -->).
Elsewhere: <!-- q missing accuracy -->0.5<!-- /q -->.

<!-- q-table qs Claims -->
| claim | ours |
|---|---|
| old | 0.1 |
<!-- /q-table -->
"""


def make_runs(tmp_path):
    runs = tmp_path / "runs"
    (runs / "rlvr").mkdir(parents=True)
    (runs / "rlvr" / "summary.json").write_text(json.dumps(
        {"accuracy_before": 0.53125, "accuracy_after": 0.671875, "accuracy_gain": 0.140625}))
    (runs / "qs").mkdir()
    (runs / "qs" / "results.md").write_text("# Results\n\n| a | b |\n|---|---|\n| x | 1 |\n\n![c](c.png)\n\n"
                                            "## Claims\n\n| claim | ours |\n|---|---|\n| new | 0.9 |\n")
    return runs


def test_check_finds_stale_quotes_and_write_regenerates_them(tmp_path, capsys):
    runs, doc = make_runs(tmp_path), tmp_path / "doc.md"
    doc.write_text(DOC)
    assert main([str(doc), "--runs", str(runs), "--check"]) == 1
    out = capsys.readouterr().out
    assert "'27.7 %' -> '53.1 %'" in out and "'45.3 %' -> '67.2 %'" in out and "unchecked" in out and "missing" in out
    assert main([str(doc), "--runs", str(runs), "--write"]) == 0
    text = doc.read_text()
    assert "-->53.1 %<!-- /q --> to <!-- q rlvr accuracy_after {pct:.1f} % -->67.2 %<!-- /q -->" in text
    assert "-->+0.141<!-- /q -->" in text
    assert "| new | 0.9 |\n<!-- /q-table -->" in text and "| old |" not in text
    assert "<!-- q missing accuracy -->0.5<!-- /q -->" in text  # no run: left as it is
    assert main([str(doc), "--runs", str(runs)]) == 0  # now current


def test_a_quote_of_a_missing_key_names_file_line_and_key(tmp_path, capsys):
    runs, doc = make_runs(tmp_path), tmp_path / "doc.md"
    doc.write_text("x\n<!-- q rlvr accuracy_typo -->1<!-- /q -->\n")
    assert main([str(doc), "--runs", str(runs)]) == 2
    err = capsys.readouterr().err
    assert f"{doc}:2" in err and "accuracy_typo" in err and "summary.json" in err


def test_helpers():
    assert format_value(0.266, ".3f") == "0.266" and format_value(-0.258, "+.3f") == "-0.258"
    assert format_value(0.453125, "{pct:.1f} %") == "45.3 %"
    with pytest.raises(KeyError, match="Claims"):
        markdown_table("# Results\n| a |\n", "Claims")


def test_the_repository_docs_quote_their_numbers():
    """README and docs mark the figures they quote; every marker is well formed (resolves against
    an empty runs folder: all unchecked, none malformed)."""
    for name, at_least in (("README.md", 8), ("docs/miniature_results.md", 1)):
        _, found = quotes_of(REPO / name, REPO / "no-such-runs-folder")
        assert len(found) >= at_least, name
        assert all(q.new is None for q in found)
