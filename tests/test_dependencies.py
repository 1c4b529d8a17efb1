"""Every package the library imports is a declared dependency (pyproject.toml), so the README's
first command (`pip install -e .` alone, no test extra, no torch) gets all of them. CI runs that
command as written; this test catches an undeclared import before it does."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib

from conftest import REPO

# Imported only behind a documented opt-in (a missing package is a clear error, not a crash):
# wandb (logging.wandb_project), pyarrow is declared anyway.
OPTIONAL = {"wandb"}
# Needed at run time without being imported by name: transformers renders chat templates with jinja2.
INDIRECT = {"jinja2"}


def declared() -> set[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def imported_top_levels() -> set[str]:
    names = set()
    for path in (REPO / "jaxrl_rm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("jaxrl_rm", "__future__")}


def test_every_imported_package_is_declared():
    dists = md.packages_distributions()
    have = declared()
    missing = []
    for name in sorted(imported_top_levels() - OPTIONAL):
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if not owners & have:
            missing.append(f"{name} (from {sorted(owners)})")
    assert not missing, f"imported by jaxrl_rm but not in pyproject.toml dependencies: {missing}"
    assert INDIRECT <= have, f"needed at run time, not declared: {sorted(INDIRECT - have)}"
    assert "torch" not in have  # a test-only oracle
