"""The package's import graph, read with `ast` from every module (imports inside functions
included): no cycle, and the layers data -> models/losses -> run -> training | evaluation -> cli
import only downwards (evaluation and training never import each other)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "focalnet_jax"
ROOT = "focalnet_jax"

# Layer of each top-level part; a module may import only parts of a lower layer, or its own part.
LAYERS = {
    "errors": -2,  # the package's error types, which every other part may raise
    "processes": -1,
    "file_lock": -1,
    "encoding": 0,
    "data": 0,
    "models": 1,
    "losses": 1,
    "run": 2,
    "config_loading": 3,
    "training": 4,
    "evaluation": 4,
    "cli": 5,
    "study": 4.5,  # drives training and evaluation through `focalnet` child processes
    "demo": 7,
    "__init__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Package modules imported anywhere in the file (`from pkg import module` -> the module)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(ROOT))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith(ROOT):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path) - {name} for name, path in modules.items()}
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_graph_is_read(graph):
    assert "focalnet_jax.run" in graph["focalnet_jax.training.step"]
    # A lazy import inside a function counts as well.
    assert "focalnet_jax.models.pretrained" in graph["focalnet_jax.training.checkpoint"]
    assert "focalnet_jax.run.workdir" in graph["focalnet_jax.evaluation.inference"]


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_layers_import_only_downwards(graph):
    bad = []
    for module, targets in graph.items():
        for target in targets:
            source_part, target_part = _part(module), _part(target)
            if source_part == target_part:
                continue
            if LAYERS[target_part] >= LAYERS[source_part]:
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_evaluation_and_training_are_independent(graph):
    for module, targets in graph.items():
        for target in targets:
            assert (_part(module), _part(target)) not in {
                ("evaluation", "training"),
                ("training", "evaluation"),
            }, f"{module} imports {target}"


def test_package_root_holds_at_most_seven_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 7, modules
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == {
        "cli", "data", "evaluation", "losses", "models", "run", "study", "training"
    }  # fmt: skip


def test_no_module_over_500_lines():
    long = {
        p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, long


def test_every_package_import_names_an_existing_module():
    """A lazy import of a moved or renamed module fails only when its function runs: catch it here,
    in the package and in the scripts and tests that import it."""
    repo = PACKAGE.parent
    folders = ("focalnet_jax", "benchmarks", "tests", "docs")
    files = [p for folder in folders for p in repo.joinpath(folder).rglob("*.py")]
    missing = sorted(
        f"{path.relative_to(repo)} imports {target}"
        for path in files
        for target in _imports(path)
        if not _is_module(target)
    )
    assert not missing, missing
