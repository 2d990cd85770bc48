"""The package's layering, read from its source with ``ast`` (nothing is imported):

- no import circle between modules of fastpeft (``fastpeft/`` and ``kernels/``, which installs as
  ``fastpeft.kernels``): each layer imports only the ones below it;
- ``kernels/`` imports only torch, triton, the standard library and its own modules (relatively).

Every ``import`` / ``from ... import`` counts, relative or absolute, at module level or inside a function,
a class, ``try`` or ``if TYPE_CHECKING``, and so do ``importlib.import_module`` / ``__import__`` calls
with a literal name. ``from pkg import name`` is an import of the module ``pkg.name`` when that is a
module of the tree, else of ``pkg`` itself. Importing a submodule also runs its package's
``__init__``; that implicit step is not an edge here (``fastpeft/__init__.py`` re-exporting what its
modules define is the point of a package, not a circle).
"""
from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS_MAY_IMPORT = {"torch", "triton"}


# ------------------------------------------------------------------------------------------ the walker


def modules_of(package_dir: Path, name: str) -> dict:
    """``{dotted module name: path}`` for the .py files under ``package_dir`` (the package ``name``).
    Symlinked folders are skipped: the checkout links kernels/ and benchmarks/ into fastpeft/ only to
    make itself importable, and kernels/ is walked as its own tree."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir)
        if any((package_dir / Path(*rel.parts[:i])).is_symlink() for i in range(1, len(rel.parts))):
            continue
        parts = [name, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _literal_import_call(node) -> str | None:
    """The module of ``importlib.import_module("x.y")`` / ``__import__("x.y")`` with a literal name."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return node.args[0].value if name in ("import_module", "__import__") else None


def imports_of(module: str, path: Path, known: set) -> list:
    """``[(imported module, line), ...]`` for every import in the file of ``module``, resolved to the
    modules in ``known`` where the names fall inside the tree (others are kept as written: ``torch.nn``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source == "__future__":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else source, node.lineno))
        else:
            name = _literal_import_call(node)
            if name is not None:
                found.append((name, node.lineno))
    return found


def import_graph(trees: dict) -> tuple:
    """``trees``: {package name: folder}. Returns (modules {name: path}, edges {module: {imported: line}})
    over the modules of the trees only."""
    modules = {}
    for name, folder in trees.items():
        modules.update(modules_of(folder, name))
    edges = {}
    for module, path in modules.items():
        for target, line in imports_of(module, path, set(modules)):
            if target in modules and target != module:  # the first line that imports it
                lines = edges.setdefault(module, {})
                lines[target] = min(line, lines.get(target, line))
    return modules, edges


def _shortest_cycle_through(start: str, edges: dict) -> list | None:
    """The shortest path start -> ... -> start (breadth-first), as a list of modules, or None."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges.get(node, {})):
            if nxt == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]  # path runs node -> ... -> start
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def import_cycles(edges: dict) -> list:
    """Every circle found as the shortest cycle through some module, rotated to start at its smallest
    name, without repeats: a->b->a and a->c->a are two circles even when a, b, c form one tangle."""
    cycles = []
    for start in sorted(edges):
        cycle = _shortest_cycle_through(start, edges)
        if cycle is None:
            continue
        ring = cycle[:-1]
        i = ring.index(min(ring))
        ring = ring[i:] + ring[:i]
        if ring + [ring[0]] not in cycles:
            cycles.append(ring + [ring[0]])
    return sorted(cycles)


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "/".join(path.parts[-2:])


def describe_cycle(cycle: list, edges: dict, modules: dict) -> str:
    """``a -> b -> a`` and, for each step, the file and line of the import."""
    steps = [f"{a} ({_show(modules[a])}:{edges[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def kernel_violations(kernels_dir: Path, name: str = "fastpeft.kernels") -> list:
    """``["x.py:12 imports numpy (numpy)", ...]``: imports of a kernels module that are not torch, triton,
    the standard library or a relative import of the kernels' own modules."""
    modules = modules_of(kernels_dir, name)
    bad = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                below = package.count(".") - name.count(".")  # package levels below kernels/ itself
                if node.level - 1 > below:  # climbs out of kernels/ (into fastpeft)
                    target = node.module or ", ".join(a.name for a in node.names)
                    bad.append((path.name, node.lineno,
                                f"{path.name}:{node.lineno} imports {'.' * node.level}{target} (outside kernels/)"))
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) else [_literal_import_call(node)])
            for full in filter(None, names):
                top = full.split(".")[0]
                if top in KERNELS_MAY_IMPORT or top in sys.stdlib_module_names:
                    continue
                what = "fastpeft" if top == "fastpeft" else "kernels by absolute name" if top == "kernels" else top
                bad.append((path.name, node.lineno, f"{path.name}:{node.lineno} imports {full} ({what})"))
    return [text for _, _, text in sorted(bad)]


# --------------------------------------------------------------------------- the walker on a fake tree


def _write(root: Path, files: dict) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_walker_finds_relative_absolute_and_function_level_circles(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\n",                                       # a -> b (submodule via 'from .')
        "b.py": "def g():\n    from .a import f\n    return f\n",          # b -> a inside a function
        "c.py": "import pkg.sub.d\n",                                      # c -> pkg.sub.d (absolute)
        "sub/__init__.py": "",
        "sub/d.py": "import importlib\nM = importlib.import_module('pkg.c')\n",  # d -> c (literal import_module)
        "e.py": "from .sub import d\nfrom . import a\n",                    # no circle through e
        "f.py": "from .sub.d import X\n",
    })
    modules, edges = import_graph({"pkg": tmp_path / "pkg"})
    assert edges["pkg.a"] == {"pkg.b": 1} and edges["pkg.b"] == {"pkg.a": 2}
    assert edges["pkg.e"] == {"pkg.sub.d": 1, "pkg.a": 2} and edges["pkg.f"] == {"pkg.sub.d": 1}
    assert "pkg.sub" not in edges  # 'pkg.sub.d' is an edge to the module, not to its package
    cycles = import_cycles(edges)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub.d", "pkg.c"]]
    assert "pkg.b (pkg/b.py:2) -> pkg.a" in describe_cycle(cycles[0], edges, modules)


def test_walker_flags_kernels_importing_outside(tmp_path):
    _write(tmp_path / "kernels", {
        "__init__.py": "import os\nimport torch\ntry:\n    import triton.language\nexcept ImportError:\n    pass\n",
        "ok.py": "from __future__ import annotations\nfrom . import helper\nfrom .helper import x\nimport math\n",
        "helper.py": "x = 1\n",
        "bad.py": ("import numpy\ndef f():\n    from fastpeft import functional\n"
                   "from .. import layers\nimport kernels.helper\n"),
    })
    assert kernel_violations(tmp_path / "kernels") == [
        "bad.py:1 imports numpy (numpy)", "bad.py:3 imports fastpeft (fastpeft)",
        "bad.py:4 imports ..layers (outside kernels/)", "bad.py:5 imports kernels.helper (kernels by absolute name)"]


# ------------------------------------------------------------------------------------ the real package


def _package_graph():
    return import_graph({"fastpeft": ROOT / "fastpeft", "fastpeft.kernels": ROOT / "kernels"})


def test_the_walker_sees_the_package():
    """Guards the walker against reading nothing: the modules and a few edges every layout has."""
    modules, edges = _package_graph()
    assert {"fastpeft", "fastpeft.cli", "fastpeft.functional", "fastpeft.kernels", "fastpeft.kernels.lora",
            "fastpeft.demo", "fastpeft.demo.data"} <= set(modules)
    # 'import fastpeft' inside functions, 'from .data import ...' and 'from .._cli import ...' at the top
    assert set(edges["fastpeft.demo.classify"]) == {"fastpeft", "fastpeft.demo.data", "fastpeft._cli"}
    assert "fastpeft.quant" in edges["fastpeft.demo.data"]  # quantize_nf4's 'from fastpeft.quant import ...' (--4bit)
    assert "fastpeft.kernels" in edges["fastpeft"]  # __init__ re-exports set_deterministic
    assert "fastpeft.kernels._common" in edges["fastpeft.kernels.multi_lora"]


def test_no_import_circles():
    modules, edges = _package_graph()
    cycles = import_cycles(edges)
    assert not cycles, "import circles between modules of fastpeft:\n" + "\n".join(
        describe_cycle(c, edges, modules) for c in cycles)


def test_kernels_import_only_torch_triton_and_the_stdlib():
    bad = kernel_violations(ROOT / "kernels")
    assert not bad, "kernels/ must import only torch, triton, the standard library and its own modules:\n" + \
        "\n".join(bad)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
