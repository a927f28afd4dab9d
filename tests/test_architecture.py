"""The package's shape as docs/ARCHITECTURE.md states it: no import cycles, every import
pointing down the layer order, internal imports at module top, every module described."""
from __future__ import annotations

import ast
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fwi_core"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Set[str]) -> Dict[str, List[int]]:
    """fwi_core modules ``path`` imports (lazy ones included) -> the lines, with
    ``from pkg import sub`` resolved to the submodule when it is one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: Dict[str, List[int]] = defaultdict(list)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        else:
            continue
        for t in targets:
            if t == "fwi_core" or t.startswith("fwi_core."):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    found[t].append(node.lineno)
    return found


def graph() -> Dict[str, Dict[str, List[int]]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def unit(module: str) -> str:
    """The layer unit of a module: its sub-package or top-level module (``fwi_core.data.io``
    -> ``data``, ``fwi_core.crf`` -> ``crf``); the package itself is ``fwi_core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fwi_core"


def floors() -> Dict[str, int]:
    """The layer order of docs/ARCHITECTURE.md: the fenced block after '## Layers', one
    line per floor, ``<floor>  <unit>, <unit> ...  <comment>`` (highest first)."""
    text = DOC.read_text()
    block = re.search(r"## Layers.*?```text\n(.*?)```", text, re.S)
    assert block, f"{DOC}: no '## Layers' section with a ```text block"
    out = {}
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+)\s+(.*?)(?:\s{2,}|$)", line)
        if m:
            for u in re.findall(r"[a-z_]+", m.group(2)):
                out[u] = int(m.group(1))
    return out


def test_no_import_cycles():
    g = graph()
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, {})):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_points_down_the_layers():
    order = floors()
    g = graph()
    units = {unit(m) for m in g} - {"fwi_core"}
    missing = sorted(units - set(order))
    assert not missing, f"{DOC}: no floor for {missing}"
    upward = []
    for m, targets in g.items():
        for t, lines in targets.items():
            a, b = unit(m), unit(t)
            if a == b or b == "fwi_core" or a == "fwi_core":
                continue
            if order[b] >= order[a]:
                upward.append(f"{m} (floor {order[a]}) imports {t} (floor {order[b]}) at line {lines[0]}")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_fwi_core_never_imports_tools_or_kernels():
    for name, path in modules().items():
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(tools|kernels)\b", text, re.M), name


def test_internal_imports_at_module_top():
    """Only optional third-party dependencies load lazily (through utils.optional_import)."""
    lazy = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith("fwi_core")):
                        lazy.append(f"{name}:{sub.lineno}")
                    elif isinstance(sub, ast.Import) and any(a.name.startswith("fwi_core") for a in sub.names):
                        lazy.append(f"{name}:{sub.lineno}")
    assert not lazy, "fwi_core imports inside functions or classes: " + ", ".join(sorted(set(lazy)))


def test_every_module_has_a_line_in_the_document():
    text = DOC.read_text()
    undocumented = [name for name, path in modules().items()
                    if path.name not in ("__init__.py", "__main__.py")
                    and f"`{path.relative_to(PACKAGE).as_posix()}`" not in text]
    assert not undocumented, f"{DOC}: no line for {undocumented}"


def test_no_file_over_600_lines():
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 600}
    assert not big, f"split these by job: {big}"


@pytest.mark.parametrize("check", ["cycle", "upward"])
def test_the_checks_catch_what_they_should(tmp_path, monkeypatch, check):
    """Break the layering on a copy and watch the checks fail."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "fwi_core", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "docs").mkdir()
    shutil.copy(DOC, copy / "docs" / "ARCHITECTURE.md")
    if check == "cycle":       # the ground floor reaching up into itself through another module
        (copy / "fwi_core" / "errors.py").write_text((PACKAGE / "errors.py").read_text() + "\nfrom . import utils\n")
        (copy / "fwi_core" / "utils.py").write_text("from . import errors\n" + (PACKAGE / "utils.py").read_text())
        test = test_no_import_cycles
    else:                      # metrics (pure) importing the simulator
        (copy / "fwi_core" / "metrics.py").write_text((PACKAGE / "metrics.py").read_text()
                                                      + "\nfrom .physics.forward import simulate\n")
        test = test_every_import_points_down_the_layers
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", copy)
    monkeypatch.setattr(this, "PACKAGE", copy / "fwi_core")
    monkeypatch.setattr(this, "DOC", copy / "docs" / "ARCHITECTURE.md")
    with pytest.raises(AssertionError):
        test()
