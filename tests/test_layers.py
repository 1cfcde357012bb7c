"""The import contract: each layer imports only those below it, no package has an import cycle
(import-linter, configured in pyproject.toml), and nothing reaches into another module's private
names: not the package, not the tests, not the benchmarks."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

ROOT = REPO


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the fxlocal package under ``root``, with the repository's contracts."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layers_hold_and_no_package_has_an_import_cycle():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "layers KEPT" in run.stdout and "no import cycles KEPT" in run.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("graph/plan.py", "from ..aux import get_aux", "layers BROKEN"),  # a pass importing a method
    ("graph/trace.py", "from . import analyze", "no import cycles BROKEN"),  # analyze -> candidates -> trace
])
def test_the_contract_catches_an_upward_import_and_a_cycle(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "fxlocal", tmp_path / "fxlocal", ignore=shutil.ignore_patterns("__pycache__", "datasets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "fxlocal" / module
    future = "from __future__ import annotations\n"
    assert future in path.read_text()  # the import goes after it, where Python allows one
    path.write_text(path.read_text().replace(future, f"{future}{line}\n", 1))
    run = lint_imports(tmp_path)
    assert run.returncode != 0 and broken in run.stdout, run.stdout[-3000:]


def _fxlocal_module(node: ast.ImportFrom, path: Path, root: Path) -> str | None:
    """The fxlocal module an import names (relative imports resolved against ``path``), or None."""
    if node.level:
        package = path.relative_to(root).with_suffix("").parts[:-1]
        base = list(package[: len(package) - node.level + 1])
        return ".".join(base + ([node.module] if node.module else []))
    return node.module if node.module and node.module.split(".")[0] == "fxlocal" else None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reaches(path: Path, root: Path = ROOT) -> list[str]:
    """In one file: ``from <fxlocal module> import _name``, ``<fxlocal module>._name``, and a
    private name reached by string (``setattr(module, "_name", …)``, ``monkeypatch.setattr``,
    ``getattr``, ``delattr``)."""
    tree = ast.parse(path.read_text())
    where = path.relative_to(root)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (module := _fxlocal_module(node, path, root)) is not None:
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{where}:{node.lineno} imports {module}.{alias.name}")
                modules.add(alias.asname or alias.name)  # may be a module: its attributes are checked
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fxlocal":
                    modules.add(alias.asname or alias.name.split(".")[0])

    def is_module(node: ast.AST) -> bool:
        return isinstance(node, (ast.Name, ast.Attribute)) and ast.unparse(node).split(".")[0] in modules

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and is_module(node.value):
            found.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and ast.unparse(node.func).split(".")[-1] in ("setattr", "getattr", "delattr", "hasattr")
              and len(node.args) >= 2 and is_module(node.args[0])
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            found.append(f"{where}:{node.lineno} reaches {ast.unparse(node.args[0])}.{node.args[1].value} by name")
    return found


def test_nothing_reaches_into_another_modules_private_names():
    files = [p for folder in ("fxlocal", "tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 60
    reaches = [r for p in files for r in private_reaches(p)]
    assert not reaches, "\n".join(reaches)


def test_the_private_name_check_sees_every_form(tmp_path):
    probe = tmp_path / "tests" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import fxlocal.local_model as lm\nfrom fxlocal.convert import _num_classes\nlm._isolated(())\n"
                     "monkeypatch.setattr(lm, '_hidden', None)\nsetattr(lm, 'public', None)\n")
    found = private_reaches(probe, root=tmp_path)
    assert sorted(f.split(" ", 1)[1] for f in found) == [
        "imports fxlocal.convert._num_classes", "reaches lm._hidden by name", "uses lm._isolated"], found


def test_every_top_level_module_is_in_a_layer():
    """A new module or package directly under fxlocal/ must be given a layer, or the contract
    would not check it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    listed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    present = {f"fxlocal.{p.stem}" for p in (ROOT / "fxlocal").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert present == listed, f"in no layer: {sorted(present - listed)}; listed but absent: {sorted(listed - present)}"


def test_the_public_api_keeps_its_names():
    """What ``fxlocal`` exported before the packages were layered is still there, and each name
    is the object its layer defines."""
    import fxlocal
    from fxlocal.convert import convert
    from fxlocal.graph.partition import partition
    from fxlocal.graph.trace import trace
    from fxlocal.local_model import LocalModel

    before = ["AnalyzedModel", "BlockPlan", "Cost", "CutCandidate", "FxLocalError", "GraphAnalysis", "LocalModel",
              "Plan", "TraceReport", "analyze", "analyze_model", "available_aux", "convert", "create_model",
              "find_cut_candidates", "recomputable_values", "get_aux", "min_max_partition", "partition",
              "register_aux", "split_graph", "trace"]
    assert set(before) <= set(fxlocal.__all__) and all(callable(getattr(fxlocal, n)) for n in before)
    assert (fxlocal.convert, fxlocal.partition, fxlocal.trace, fxlocal.LocalModel) == (convert, partition, trace, LocalModel)
