"""The code's shape: no module reaches into another's private names (the layers are checked by lint-imports)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("embedpipe", "langchain_embedpipe", "llamaindex_embedpipe")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _offences(path: Path) -> list[str]:
    """``from a.b import _x`` and ``import a._b`` where the private name is not the importer's own package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    own = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    # Private names this file defines (methods, attributes it sets): using those on its own objects is fine.
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    defined |= {n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "")
                in ("setattr", "getattr") and len(n.args) > 1 and isinstance(n.args[1], ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # A package's private module (embedpipe._urls) is the package's own business: what counts is
                # a private *name* taken out of another module, or anything private from another package.
                submodule = (ROOT / node.module.replace(".", "/") / alias.name).with_suffix(".py").is_file()
                same_package = node.module.partition(".")[0] == own.partition(".")[0]
                if _private(alias.name) and node.module != own and not (submodule and same_package):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and not _is_self(node.value) \
                and node.attr not in defined:
            # obj._x where this file defines no _x: reaching into another module's internals
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_imports_a_private_name_from_another() -> None:
    offences = [o for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py")) for o in _offences(path)]
    assert not offences, "private names used across modules:\n" + "\n".join(offences)


def test_the_check_catches_an_offence(tmp_path: Path) -> None:
    bad = ROOT / "embedpipe" / "_layer_probe_tmp.py"
    bad.write_text("from embedpipe.jobs.runner import _spec\n", encoding="utf-8")
    try:
        assert _offences(bad) == ["embedpipe/_layer_probe_tmp.py:1: from embedpipe.jobs.runner import _spec"]
    finally:
        bad.unlink()
