"""The package layers import downwards only (../shared/design.md, "Layout"): records, tokenizers and
data pipelines know nothing of models; models, kernels, objectives and the mesh know nothing of
sampling; sampling and rollout collection nothing of rewards; rewards and evaluation nothing of the
training loops. An upward import makes a circle as soon as the lower layer is imported first (the
one that was: `data.synthetic` <-> `rewards.sources` over `PromptItem`, now a record type)."""

import ast

from conftest import REPO

LAYERS = {"data": 0, "models": 1, "kernels": 1, "objectives": 1, "parallel": 1, "sampling": 2, "rollout": 2,
          "rewards": 3, "eval": 3, "train": 4}


def upward_imports() -> list[str]:
    found = []
    for path in sorted((REPO / "jaxrl_rm").rglob("*.py")):
        rel = path.relative_to(REPO / "jaxrl_rm")
        layer = LAYERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if layer is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                parts = module.split(".")
                if parts[0] == "jaxrl_rm" and len(parts) > 1 and LAYERS.get(parts[1], -1) > layer:
                    found.append(f"jaxrl_rm/{rel}:{node.lineno} imports {module}")
    return found


def test_layers_import_downwards_only():
    assert upward_imports() == []


def test_every_package_has_a_layer():
    packages = {p.name for p in (REPO / "jaxrl_rm").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))
