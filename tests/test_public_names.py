"""Each public name means one thing across the project: no two packages define the same module-level name
(a ``def``, ``class`` or assignment without a leading underscore, defined in that module, not imported).

Two ``DomainInfo`` classes (a store's version list and a network's loaded domain) or two
``load_backbone`` functions (an artifact directory, a spec string) made callers guess which one an import
meant. A few names are one protocol implemented per module, not two meanings; they are listed with why."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "domain_format": ROOT / "domain_format",
    "residual_adapters": ROOT / "residual_adapters",
    "adapters_store": ROOT / "adapters_store",
    "model_artifacts": ROOT / "model_artifacts",
    "server": ROOT / "server",
    "training": ROOT / "training",
    "multidomain": ROOT / "multidomain",
    "multidomain_client": ROOT / "client" / "multidomain_client",
    "bench": ROOT / "bench",
}
PROTOCOLS = {
    "main": "the entry point of a runnable module (python -m ...)",
    "register": "a command group's hook: multidomain.cli calls register(subparsers) on each group module",
    "log": "each module's own logger",
}


def defined_names(path: Path) -> set[str]:
    """Public names a module defines itself (imports, re-exports and dunder names excluded)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def clashes(packages: dict[str, Path]) -> dict[str, list[str]]:
    """name -> the modules defining it, for names defined in more than one package."""
    where: dict[str, list[str]] = defaultdict(list)
    for package, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            for name in defined_names(path):
                where[name].append(f"{package}:{path.relative_to(root)}")
    return {
        name: modules
        for name, modules in where.items()
        if len({m.split(":")[0] for m in modules}) > 1 and name not in PROTOCOLS
    }


def test_every_package_exists() -> None:
    assert all((root / "__init__.py").is_file() for root in PACKAGES.values())


def test_no_two_packages_define_one_name() -> None:
    found = clashes(PACKAGES)
    assert not found, "one name, several things (rename one, or import the other): " + "; ".join(
        f"{name} in {', '.join(modules)}" for name, modules in sorted(found.items())
    )


def test_the_check_sees_a_name_defined_twice(tmp_path: Path) -> None:
    """The walk can fail: a class, a constant and a function redefined in a second package are found,
    a re-export and a private name are not."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "m.py").write_text("class DomainInfo: ...\nLIMIT = 1\ndef load(): ...\n_hidden = 1\n")
    (tmp_path / "b" / "n.py").write_text(
        "from a.m import load\nclass DomainInfo: ...\nLIMIT: int = 2\n_hidden = 2\ndef main(): ...\n"
    )
    (tmp_path / "b" / "o.py").write_text("def main(): ...\n")
    found = clashes({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert set(found) == {"DomainInfo", "LIMIT"}
    assert found["DomainInfo"] == ["a:m.py", "b:n.py"]
