"""The import layers of pipeline/ (pipeline/layers.py) hold: no upward import, no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.layers import LAYERS, layer_of, may_import

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def _module_name(path: Path) -> str:
    rel = path.relative_to(path.parents[len(path.parts) - path.parts.index("pipeline") - 1]).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if mod == "pipeline":  # `from pipeline import cache`: the names are the packages
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def layer_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = _top(_module_name(path))
        if me is None:
            continue
        for line, mod in _imports(path):
            other = _top(mod)
            if other is None or other == me:
                continue
            try:
                ok = may_import(me, other)
            except KeyError as e:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {e}")
                continue
            if not ok:
                bad.append(f"{path.relative_to(root.parent)}:{line}: pipeline.{me} (layer {layer_of(me)}) imports "
                           f"{mod} (layer {layer_of(other)})")
    return sorted(set(bad))


def _module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for _, imp in _imports(p):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != m and not m.startswith(imp + "."):  # a package's own __init__ is not a dependency cycle
                graph[m].add(imp)
    return graph


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Cycles between top-level packages of pipeline/ (module imports collapsed to packages)."""
    graph: dict[str, set[str]] = {}
    for m, deps in _module_graph(root).items():
        a = _top(m)
        if a is None:
            continue
        graph.setdefault(a, set()).update(t for d in deps if (t := _top(d)) and t != a)
    cycles, state = [], {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles


def test_every_package_is_in_a_layer():
    pkgs = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} | \
           {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    for p in sorted(pkgs):
        layer_of(p)
    assert sum(len(x) for x in LAYERS) >= len(pkgs)


def test_no_upward_import():
    assert layer_violations() == []


def test_no_import_cycle():
    assert import_cycles() == []


def test_an_upward_import_is_caught(tmp_path):
    """A copy of pipeline/ with one deliberate upward import (cache -> train) fails both checks."""
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "cache" / "store.py", "a") as f:
        f.write("\nfrom pipeline.train.trainer import TrainConfig  # deliberate upward import\n")
    bad = layer_violations(copy)
    assert len(bad) == 1 and "pipeline.cache (layer 5) imports pipeline.train.trainer" in bad[0]
    assert import_cycles(copy)  # train imports cache, and now cache imports train


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["extract", "--help"], ["sweep", "--help"],
                                  ["bench", "memory", "--help"]])
def test_help_imports_no_heavy_library(argv):
    code = ("import sys, runpy; sys.argv = ['lst', *%r]\n"
            "try:\n    runpy.run_module('pipeline.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'zarr', 'dask', 'numpy', 'pandas') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)" % (argv,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in r.stderr, r.stderr[-2000:]
