"""The package's shape, checked from its imports (every ``import`` statement, also those inside functions).

* no circle between modules of ``rlad_pl/``;
* arrows run one way down the layers: cli -> training -> pipeline -> teacher -> rollout -> objectives / data ->
  models -> core (``testing`` sits on top, for tests and tools: it may use anything, nothing at runtime uses it);
* the rollout pipeline and the data side import no Lightning, and never name the module or the trainer's module;
  the module never names the data module;
* ``DistillationModule`` is under 300 lines and no file of ``rlad_pl/`` is over 500.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rlad_pl"
#: layer of each top-level part of the package: an import may only point to the same part or a lower layer
LAYERS = {"cli": 8, "__main__": 9, "training": 7, "pipeline": 6, "teacher": 5, "rollout": 4, "objectives": 3,
          "data": 3, "models": 2, "core": 1, "__init__": 0, "testing": 10}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The ``rlad_pl`` modules ``path`` imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rlad_pl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlad_pl"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in files and m != name} for name, p in files.items()}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_arrows_run_down_the_layers():
    up = []
    for src, targets in graph().items():
        for dst in targets:
            if part(src) != part(dst) and LAYERS[part(dst)] >= LAYERS[part(src)] and part(dst) != "__init__":
                up.append(f"{src} -> {dst}")
    assert up == []


@pytest.mark.parametrize("folder", ["pipeline", "data", "rollout", "teacher", "objectives", "core", "models"])
def test_lower_layers_do_not_know_lightning_or_the_module(folder):
    for path in (PKG / folder).rglob("*.py"):
        names = {m.split(".")[0] for m in _all_imports(path)}
        assert "lightning" not in names, f"{path} imports lightning"
        used = _code_names(path)
        for word in ("lightning_module", "DistillationModule", "datamodule", "annotate_rollouts"):
            assert word not in used, f"{path} uses {word}"


def test_module_never_reads_the_data_module():
    for name in ("module.py", "hooks.py", "models.py"):
        assert "datamodule" not in _code_names(PKG / "training" / name), name


def _code_names(path: Path) -> set[str]:
    """Identifiers and attribute names used in code (not in docstrings or comments)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            out.add(node.value)  # getattr(x, "datamodule")
    return out


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_file_sizes():
    module_lines = len((PKG / "training" / "module.py").read_text().splitlines())
    assert module_lines < 300, f"DistillationModule file has {module_lines} lines"
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 500}
    assert big == {}
