"""The floors of the package: every import points down a floor, never up, never in a circle.

Every ``import`` of a hubtool module counts, deferred ones inside functions included. The floor of a
module is the floor of the longest prefix of its name in ``FLOORS``; a module not listed falls under
``hubtool`` itself, the top floor, so that nothing below may import it until it is placed on purpose. ``python tests/test_floors.py [ROOT]`` prints the violations of
any checkout (e.g. of an older commit).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# floor -> module prefixes (the README's Layout section says the same in words)
FLOORS: dict[int, tuple[str, ...]] = {
    0: (
        "hubtool.__about__",
        "hubtool.errors",
        "hubtool.record",
        "hubtool.core",
        "hubtool.rundir",
        "hubtool.cache",
        "hubtool.assets",
    ),
    1: ("hubtool.kernels",),
    2: ("hubtool.quant", "hubtool.formats"),
    3: ("hubtool.runtime", "hubtool.source"),
    4: ("hubtool.stages", "hubtool.envinfo", "hubtool.bench_kernels"),
    5: ("hubtool.pipeline", "hubtool.config"),
    6: ("hubtool.cli", "hubtool.integrations", "hubtool.__main__", "hubtool"),
}


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the hubtool package under ``root``: dotted name -> file."""
    out = {}
    for path in sorted((root / "hubtool").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The hubtool modules ``name`` imports anywhere in its file (deferred imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names
            ]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import hubtool.x.y` of a name inside a module
                t = t.rpartition(".")[0]
            if t.startswith("hubtool") and t != name:
                found.add(t)
    return found


def floor_of(name: str) -> int | None:
    """The floor of a module (longest matching prefix), None when it has none."""
    best, floor = -1, None
    for f, prefixes in FLOORS.items():
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), f
    return floor


def violations(root: Path) -> list[str]:
    """Modules without a floor, imports pointing up a floor, and import cycles, as lines."""
    modules = module_names(root)
    graph = {n: imports(n, p, modules) for n, p in modules.items()}
    out = [f"{n}: no floor" for n in modules if floor_of(n) is None]
    for n, targets in sorted(graph.items()):
        for t in sorted(targets):
            fn, ft = floor_of(n), floor_of(t)
            if fn is not None and ft is not None and ft > fn:
                out.append(f"{n} (floor {fn}) imports {t} (floor {ft})")
    out += [" -> ".join(c) for c in cycles(graph)]
    packages: dict[str, set[str]] = {}  # hubtool.quant.x -> hubtool.quant: no cycle between packages either
    for n, targets in graph.items():
        packages.setdefault(_package(n), set()).update(
            _package(t) for t in targets if _package(t) != _package(n)
        )
    out += ["packages: " + " -> ".join(c) for c in cycles(packages)]
    return out


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_and_none_circles():
    bad = violations(ROOT)
    assert not bad, "\n".join(bad)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "hubtool" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_check_catches_an_upward_deferred_import_a_cycle_and_an_unplaced_module(tmp_path):
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/spec.py": "def f():\n    from ..runtime import backends\n",  # deferred, floor 0 -> 3
            "runtime/__init__.py": "",
            "runtime/backends.py": "from . import int4linear\n",
            "runtime/int4linear.py": "from .backends import x\n",  # a cycle inside one floor
            "gadgets.py": "",  # no floor
            "quant/__init__.py": "",
            "quant/rtn.py": "from ..formats import export\n",
            "formats/__init__.py": "",
            "formats/export.py": "def f():\n    from ..quant import signround\n",
            "quant/signround.py": "",
        },
    )
    bad = violations(root)
    assert "hubtool.core.spec (floor 0) imports hubtool.runtime.backends (floor 3)" in bad
    assert "hubtool.runtime.backends -> hubtool.runtime.int4linear -> hubtool.runtime.backends" in bad
    assert "packages: hubtool.formats -> hubtool.quant -> hubtool.formats" in bad  # modules: no cycle
    assert "hubtool.gadgets: no floor" not in bad  # the top package's floor covers it ...
    assert floor_of("hubtool.gadgets") == 6  # ... as floor 6, so nothing below may import it


if __name__ == "__main__":
    lines = violations(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print("\n".join(lines) or "no violations")
    sys.exit(1 if lines else 0)
