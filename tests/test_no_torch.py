"""The library never needs torch (a test-only oracle, DEVELOPERS.md): in a process where torch
cannot be found, `python -m jaxrl_rm.main --help` runs and every module of `jaxrl_rm` imports, and
torch is never loaded."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Installed before anything else: torch (and torch.*) is "not installed" for this process, as far
# as `import torch` and `importlib.util.find_spec("torch")` (transformers' and datasets' probe) see.
SCRIPT = r'''
import importlib, importlib.abc, io, json, pkgutil, runpy, sys
from contextlib import redirect_stdout


class NoTorch(importlib.abc.MetaPathFinder):
    """The meta path, minus torch."""

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


sys.meta_path[:] = [NoTorch(list(sys.meta_path))]
try:
    import torch
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("the torch block does not hold")
assert importlib.util.find_spec("torch") is None

# python -m jaxrl_rm.main --help
help_text, code = io.StringIO(), None
sys.argv = ["jaxrl_rm.main", "--help"]
with redirect_stdout(help_text):
    try:
        runpy.run_module("jaxrl_rm.main", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
after_help = sorted(m for m in sys.modules if m.partition(".")[0] == "torch")

import jaxrl_rm
names = ["jaxrl_rm"]
for info in pkgutil.walk_packages(jaxrl_rm.__path__, "jaxrl_rm.", onerror=lambda name: sys.exit(f"cannot import {name}")):
    names.append(info.name)
for name in names:
    importlib.import_module(name)
print(json.dumps({"help_code": code, "help": help_text.getvalue(), "after_help": after_help, "modules": names,
                  "torch": sorted(m for m in sys.modules if m.partition(".")[0] == "torch")}))
'''


def test_main_help_and_every_module_import_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["help_code"] == 0 and "usage: python -m jaxrl_rm.main" in result["help"]
    assert "grpo.kl_coef" in result["help"]  # the config keys table
    assert result["after_help"] == []
    expected = {".".join(("jaxrl_rm", *p.relative_to(REPO / "jaxrl_rm").with_suffix("").parts)).removesuffix(".__init__")
                for p in (REPO / "jaxrl_rm").rglob("*.py")}
    assert expected <= set(result["modules"]), expected - set(result["modules"])  # every module was imported
    assert result["torch"] == []
