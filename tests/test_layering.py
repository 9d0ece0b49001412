"""The architecture's layering rules, checked on the whole package from its source (ast only, nothing imported):
no import cycle, argparse only under ``cli/``, ``ray`` only under ``distributed/``, no private name of one
module used by another."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSER_CALLS = {"add_argument", "add_parser", "add_subparsers"}


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def layering(root: Path, package: str) -> dict[str, list]:
    """Every breach of the rules, by kind (each list empty when the package keeps them)."""
    mods = modules(root, package)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    found: dict[str, list] = {"cycles": [], "argparse_outside_cli": [], "ray_outside_distributed": [],
                              "private_across_modules": []}
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> project module
        for node in ast.walk(tree):
            names: list[tuple[str, str | None]] = []  # (module, imported name)
            if isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
                for a in node.names:
                    if a.name in mods:
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _target(m, path, node)
                names = [(target, a.name) for a in node.names]
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in PARSER_CALLS and not m.startswith(f"{package}.cli")):
                found["argparse_outside_cli"].append(m)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and aliases.get(node.value.id) not in (None, m) and node.attr.startswith("_")
                  and not node.attr.startswith("__")):
                found["private_across_modules"].append((m, aliases[node.value.id], node.attr))
            for module, name in names:
                top = module.split(".")[0]
                if top == "argparse" and not m.startswith(f"{package}.cli"):
                    found["argparse_outside_cli"].append(m)
                if top == "ray" and not m.startswith(f"{package}.distributed"):
                    found["ray_outside_distributed"].append(m)
                target = f"{module}.{name}" if name and f"{module}.{name}" in mods else module
                if target in mods and target != m:
                    edges[m].add(target)
                if (name and name.startswith("_") and not name.startswith("__") and module in mods
                        and module != m):
                    found["private_across_modules"].append((m, module, name))
    found["cycles"] = _cycles(edges)
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_every_layering_rule():
    assert layering(ROOT, "simex_ray") == {"cycles": [], "argparse_outside_cli": [], "ray_outside_distributed": [],
                                           "private_across_modules": []}


def test_the_check_finds_each_kind_of_breach(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("import argparse\n")  # allowed here
    (pkg / "a.py").write_text("from . import b\nimport ray\n")
    (pkg / "b.py").write_text("from .a import _hidden\nimport argparse\n")
    (pkg / "c.py").write_text("from pkg import b\nx = b._secret\ndef f(p):\n    p.add_argument('--x')\n")
    found = layering(tmp_path, "pkg")
    assert found["cycles"] == [["pkg.a", "pkg.b"]]
    assert sorted(set(found["argparse_outside_cli"])) == ["pkg.b", "pkg.c"]
    assert found["ray_outside_distributed"] == ["pkg.a"]
    assert sorted(found["private_across_modules"]) == [("pkg.b", "pkg.a", "_hidden"), ("pkg.c", "pkg.b", "_secret")]
