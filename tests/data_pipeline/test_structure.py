"""The package's shape: stages never import each other (the CLI composes them), shared modules import no
stage, and only data_pipeline.layout spells out the run folder's names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "data_pipeline"
STAGES = {"data_pipeline.filter", "data_pipeline.download", "data_pipeline.label", "data_pipeline.validate"}
RUN_FOLDER_NAMES = {"filtered", "brushdata", "state", "index.json", "_retry", "_site", "_SUMMARY.json"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("data_pipeline", *path.relative_to(PACKAGE).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_stages_import_no_other_stage_and_shared_modules_import_no_stage():
    modules = _modules()
    assert set(modules) >= STAGES
    for name, tree in modules.items():
        if name in ("data_pipeline.cli", "data_pipeline.__main__") or name.startswith("data_pipeline.tools"):
            continue  # the entry points and the tools may use the stages
        imported = _imports(tree)
        assert not (imported & (STAGES - {name})), (name, sorted(imported & STAGES))
        assert not {i for i in imported if i.startswith(("data_pipeline.cli", "data_pipeline.tools"))}, name
        assert not {i for i in imported if i.split(".")[0] == "train"}, name


def test_only_the_layout_module_names_run_folder_paths():
    for name, tree in _modules().items():
        if name == "data_pipeline.layout":
            continue
        literals = {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in RUN_FOLDER_NAMES
        }
        assert not literals, (name, literals)
