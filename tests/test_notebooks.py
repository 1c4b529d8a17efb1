"""notebooks/: in sync with their generator, committed without outputs, and executing top to bottom.

Each notebook runs in a fresh kernel (this interpreter, via a kernelspec written to a temp dir, so
a fresh CI venv needs no `ipykernel install`) with the working directory a temp dir and
`JAXRL_RM_NOTEBOOK_TINY=1`, which the notebooks read to shrink their step counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
#: Per-cell hang guard in tiny mode (nbclient's timeout; not a speed test: CI machines are shared).
NOTEBOOK_TIMEOUT_S = 900


def test_notebooks_exist_match_generator_and_have_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"], NOTEBOOKS
    done = subprocess.run([sys.executable, str(NOTEBOOK_DIR / "_build.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"
        sources = "\n".join(c.source for c in nb.cells)
        assert "JAXRL_RM_NOTEBOOK_TINY" in sources, f"{path.name} must read the tiny-mode switch"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec that runs *this* interpreter (the venv with jaxrl_rm), found first on JUPYTER_PATH."""
    pytest.importorskip("ipykernel")
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    name = "jaxrl-rm-notebook-test"
    install(kernel_name=name, prefix=str(prefix))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"),
                                                                os.environ.get("JUPYTER_PATH")])))
        yield name


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 120)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, kernel_name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JAXRL_RM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAXRL_RM_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("JAXRL_RM_MODEL_DIR", raising=False)
    monkeypatch.delenv("JAXRL_RM_RUN_DIRS", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=NOTEBOOK_TIMEOUT_S, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{str(e)[-6000:]}")
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")  # informative; no bound on a shared machine
    # what keeps it short is tiny mode (fewer steps), not the clock: the setup cell reports it
    texts = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.get("output_type") == "stream"]
    assert any("tiny=True" in t for t in texts), f"{path.name} did not run in tiny mode"
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.get("output_type") == "display_data" and "image/png" in o.get("data", {}))
    assert images >= 1, f"{path.name} drew no inline plot"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
