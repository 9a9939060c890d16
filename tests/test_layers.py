"""The layer rules of docs/architecture.md, checked on the import graph drawn from the code.

Every ``import`` and ``from ... import`` in src/alignline counts, at module level or inside a function (a
deferred import is still a dependency) and under ``TYPE_CHECKING`` too (a type from a higher layer ties the
lower one to it all the same). A module may import its own layer and the layers below it, never one above;
no two modules may import each other, directly or through others; the pure modules import only the standard
library and torch.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "alignline"

#: Lowest first: a module may import modules of its own layer and of the layers before it in this list, never of
#: a layer after it. A module belongs to the first layer naming it or a package above it (``alignline.stages``
#: names every stage module). docs/architecture.md ("Layers") says the same in words.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("pure", ("alignline.losses", "alignline.advantages")),
    ("base", ("alignline.errors", "alignline.hub", "alignline.data", "alignline.config", "alignline.telemetry")),
    ("models", ("alignline.models",)),
    ("train", ("alignline.train",)),
    ("generate", ("alignline.generate",)),
    ("judges", ("alignline.judges", "alignline.rewards", "alignline.evaluate", "alignline.matrix")),
    ("report", ("alignline.report",)),
    ("top", ("alignline.stages", "alignline.pipeline", "alignline.api", "alignline.cli", "alignline.__main__",
             "alignline")),
]
PURE_MAY_IMPORT = {"torch"}
"""Beyond the standard library, what the pure layer's modules may import."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(name: str, path: Path) -> list[str]:
    """Every name ``path`` imports (absolute; a relative import resolved against ``name``), each ``from X import
    Y`` as ``X.Y`` (the module X.Y when Y is one, else resolved to X by :func:`owner`)."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.extend(f"{base}.{alias.name}" for alias in node.names)
    return out


def owner(name: str, known: dict[str, Path]) -> str | None:
    """The module of ``known`` that ``name`` (a module or a name in one) lives in; None outside the package."""
    while name not in known:
        if "." not in name:
            return None
        name = name.rpartition(".")[0]
    return name


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: the package modules it imports}, {module: the top-level outside packages it imports})."""
    known = modules()
    inside: dict[str, set[str]] = defaultdict(set)
    outside: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for imported in imported_names(name, path):
            target = owner(imported, known)
            if target is None:
                outside[name].add(imported.partition(".")[0])
            elif target != name:
                inside[name].add(target)
    return inside, outside


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        # "alignline" names the package's own __init__ (the lazy Python API), not everything under it
        if any(module == p or (p != "alignline" and module.startswith(p + ".")) for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every module of one can
    reach every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def pure_violations(graph: dict[str, set[str]], outside: dict[str, set[str]]) -> list[str]:
    allowed = set(sys.stdlib_module_names) | PURE_MAY_IMPORT
    out = []
    for module in sorted(modules()):
        if layer_of(module) != 0:
            continue
        out.extend(f"{module} imports {m}" for m in sorted(graph.get(module, ())))
        out.extend(f"{module} imports {m}" for m in sorted(outside.get(module, set()) - allowed))
    return out


# --------------------------------------------------------------------------------------------- the rules


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_lower_layer_imports_a_higher_one():
    graph, _ = import_graph()
    found = layer_violations(graph)
    assert not found, "\n".join(map(str, found))


def test_no_import_cycle_between_modules():
    graph, _ = import_graph()
    found = cycles(graph)
    assert not found, "\n".join(map(str, found))


def test_pure_modules_import_only_the_standard_library_and_torch():
    graph, outside = import_graph()
    found = pure_violations(graph, outside)
    assert not found, "\n".join(map(str, found))


# --------------------------------------------------------------------------------------- the checker itself


def test_the_checker_finds_what_it_exists_for():
    """A made-up graph: data imports stages (upward), a <-> b through c (a cycle of three), losses imports
    numpy and data (not pure). Every one is found; a downward import and a self-contained chain are not."""
    graph = {"alignline.data.io": {"alignline.stages.score", "alignline.errors"},
             "alignline.judges.a": {"alignline.judges.b"}, "alignline.judges.b": {"alignline.judges.c"},
             "alignline.judges.c": {"alignline.judges.a", "alignline.models.loading"},
             "alignline.stages.score": {"alignline.judges.a"}}
    assert layer_violations(graph) == ["alignline.data.io (base) imports alignline.stages.score (top)"]
    assert cycles(graph) == [["alignline.judges.a", "alignline.judges.b", "alignline.judges.c"]]
    assert cycles({"alignline.x": {"alignline.y"}, "alignline.y": {"alignline.x"}}) == [
        ["alignline.x", "alignline.y"]]
    assert pure_violations({"alignline.losses": {"alignline.data.io"}},
                           {"alignline.losses": {"torch", "math", "numpy"}}) == [
        "alignline.losses imports alignline.data.io", "alignline.losses imports numpy"]


def test_imports_are_read_wherever_they_are(tmp_path):
    """Module level, inside a function, under TYPE_CHECKING and relative imports all count; ``from pkg import
    mod`` is an import of the module pkg.mod."""
    path = tmp_path / "x.py"
    path.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                    "from alignline.data import io\nif TYPE_CHECKING:\n    from alignline.stages.score import A\n"
                    "def f():\n    import alignline.judges.reward\n    from .sibling import g\n")
    names = imported_names("alignline.train.x", path)
    known = modules()
    assert {owner(n, known) for n in names} >= {"alignline.data.io", "alignline.stages.score",
                                                 "alignline.judges.reward"}
    assert "alignline.train.sibling.g" in names


def missing_modules(known: dict[str, Path] | None = None) -> list[str]:
    """Package modules that an import names but that do not exist (a move that left an import behind, e.g. one
    under ``TYPE_CHECKING`` that never runs): ``import alignline.X`` or ``from alignline.X import Y`` where
    alignline.X is no module of the package."""
    known = modules() if known is None else known
    out = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module]
            out += [f"{name} imports {t}" for t in targets if t.startswith("alignline") and t not in known]
    return out


def test_every_imported_package_module_exists(tmp_path):
    assert missing_modules() == []
    moved = tmp_path / "x.py"
    moved.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from alignline.train.gone import X\n"
                     "import alignline.y\n")
    assert missing_modules({"alignline.x": moved, "alignline.y": moved}) == [
        "alignline.x imports alignline.train.gone", "alignline.y imports alignline.train.gone"]
