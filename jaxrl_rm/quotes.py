"""Numbers the docs quote, regenerated from the run directories that produced them.

`python -m jaxrl_rm.quotes README.md docs/miniature_results.md --runs runs [--write | --check]`

A figure in a markdown file is written inside a marker naming where it comes from, so it can be
rewritten from the run and cannot drift from the code silently (markers are HTML comments, which
markdown renders as nothing):

    takes it from <!-- q rlvr_tiny accuracy_before {pct:.1f} % -->27.7 %<!-- /q --> to ...
    <!-- q-table quickstart Results -->
    | stage | metric | before | after | gain |
    ...
    <!-- /q-table -->

- `q RUN KEY [FORMAT]`: the value of `KEY` in `<runs>/RUN/summary.json`. FORMAT is a Python format
  spec (`.3f`, `+.3f`; default `.3f`) or, when it holds `{`, a template over `v` (the value) and
  `pct` (100 · value), e.g. `{pct:.1f} %`.
- `q-table RUN SECTION`: the first markdown table under the heading `SECTION` of
  `<runs>/RUN/results.md` (a pipeline's `# Results` comparison or its `## Claims` table).

`--check` (the default) exits 1 listing every quote whose text differs from its run, `--write`
rewrites them in place. A quote whose run has no `summary.json` / `results.md` under `--runs` (not run there, or not
finished) is listed as unchecked and does not fail the check (CI checks what it ran; the rest
needs its own run). A key or section missing from a finished run is an error (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

_INLINE = re.compile(r"<!-- q (?P<args>[^>]*?) -->(?P<body>.*?)<!-- /q -->", re.S)
_TABLE = re.compile(r"<!-- q-table (?P<args>[^>]*?) -->\n(?P<body>.*?)<!-- /q-table -->", re.S)


class QuoteError(ValueError):
    """A marker that cannot be resolved: names the file, the marker and what is missing."""


@dataclasses.dataclass
class Quote:
    file: str
    marker: str
    run: str
    old: str
    new: str | None  # None: no finished run to read (unchecked)


def format_value(value, spec: str) -> str:
    """`spec` is a format spec (`.3f`) or a template over `v` and `pct` (`{pct:.1f} %`)."""
    value = float(value)
    if "{" in spec:
        return spec.format(v=value, pct=100.0 * value)
    return format(value, spec)


def markdown_table(text: str, section: str) -> str:
    """The first markdown table (consecutive lines starting with `|`) after the heading `section`."""
    lines = text.splitlines()
    heading = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+\s*{re.escape(section)}\s*", line.strip())]
    if not heading:
        raise KeyError(f"no heading {section!r}")
    rows, started = [], False
    for line in lines[heading[0] + 1:]:
        if line.startswith("|"):
            rows.append(line)
            started = True
        elif started or line.startswith("#"):
            break
    if not rows:
        raise KeyError(f"no table under heading {section!r}")
    return "\n".join(rows) + "\n"


def _resolve_inline(args: list[str], runs: Path, where: str) -> tuple[str, str | None]:
    if len(args) not in (2, 3):
        raise QuoteError(f"{where}: expected `q RUN KEY [FORMAT]`")
    run, key = args[0], args[1]
    spec = args[2] if len(args) == 3 else ".3f"
    summary_path = runs / run / "summary.json"
    if not summary_path.exists():  # not run here, or not finished
        return run, None
    summary = json.loads(summary_path.read_text())
    if key not in summary:
        raise QuoteError(f"{where}: key {key!r} not in {summary_path}")
    return run, format_value(summary[key], spec)


def _resolve_table(args: list[str], runs: Path, where: str) -> tuple[str, str | None]:
    if len(args) < 2:
        raise QuoteError(f"{where}: expected `q-table RUN SECTION`")
    run, section = args[0], " ".join(args[1:])
    results = runs / run / "results.md"
    if not results.exists():  # not run here, or not finished
        return run, None
    try:
        return run, markdown_table(results.read_text(), section)
    except KeyError as e:
        raise QuoteError(f"{where}: {results}: {e.args[0]}") from None


def quotes_of(path: Path, runs: Path) -> tuple[str, list[Quote]]:
    """-> (the file's text with every resolvable quote regenerated, the quotes found)."""
    text, found = path.read_text(), []

    def sub(pattern, resolve, wrap):
        def repl(m):
            marker = m.group(0).split("-->")[0] + "-->"
            line = text.count("\n", 0, m.start()) + 1
            run, new = resolve(m.group("args").split(" ") if "{" not in m.group("args")
                               else _split_template(m.group("args")), runs, f"{path}:{line}: {marker}")
            found.append(Quote(str(path), marker, run, m.group("body"), new))
            return m.group(0) if new is None else wrap(m, new)
        return pattern.sub(repl, text)

    text = sub(_INLINE, _resolve_inline, lambda m, new: m.group(0).replace(
        f"-->{m.group('body')}<!-- /q -->", f"-->{new}<!-- /q -->"))
    text = sub(_TABLE, _resolve_table, lambda m, new: m.group(0).replace(
        f"-->\n{m.group('body')}<!-- /q-table -->", f"-->\n{new}<!-- /q-table -->"))
    return text, found


def _split_template(args: str) -> list[str]:
    """`RUN KEY {template with spaces}` -> [RUN, KEY, template]."""
    head, template = args[: args.index("{")].split(), args[args.index("{"):]
    return head + [template]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxrl_rm.quotes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE", help="markdown files holding quotes")
    parser.add_argument("--runs", default="runs", help="folder holding the quoted run directories (default: runs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when a quote differs from its run (default)")
    mode.add_argument("--write", action="store_true", help="rewrite the quotes from their runs")
    args = parser.parse_args(argv)
    runs, stale, unchecked, total = Path(args.runs), [], set(), 0
    for f in args.files:
        path = Path(f)
        try:
            text, found = quotes_of(path, runs)
        except (QuoteError, FileNotFoundError) as e:
            print(f"quotes error: {e}", file=sys.stderr)
            return 2
        total += len(found)
        unchecked |= {q.run for q in found if q.new is None}
        stale += [q for q in found if q.new is not None and q.new != q.old]
        if args.write and text != path.read_text():
            path.write_text(text)
    for q in stale:
        print(f"{'rewrote' if args.write else 'STALE'} {q.file} {q.marker}: {q.old.strip()!r} -> {q.new.strip()!r}")
    if unchecked:
        print(f"unchecked (no finished run under {runs}): {', '.join(sorted(unchecked))}")
    print(f"{total} quotes, {len(stale)} {'rewritten' if args.write else 'stale'}, "
          f"{len(unchecked)} runs unchecked")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
