"""The import graph keeps the layers: identity at the base, consent and export on it, gateway on top.

``identity`` imports no other idgate package; ``consent`` and ``export`` may import
``identity`` and never each other; ``gateway`` may import them all and nothing imports
``gateway``. Shared plumbing (e.g. ``identity.db``) therefore lives in ``identity``. Every
import counts, including those inside functions and under ``TYPE_CHECKING``: they couple
the packages just the same. Read from the source (AST), without importing anything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("identity", "consent", "export", "gateway")
ALLOWED: dict[str, frozenset[str]] = {
    "identity": frozenset(),
    "consent": frozenset({"identity"}),
    "export": frozenset({"identity"}),
    "gateway": frozenset({"identity", "consent", "export"}),
}
# Imports that break the layers today, each to be removed with the change that fixes it (a
# fixed one must leave this list, so it cannot come back unnoticed): (file, package imported).
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()
DATABASE_LIBRARIES = ("sqlalchemy", "sqlmodel", "alembic", "psycopg", "sqlite3")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module name an import statement of the file names (``from a import b`` gives a.b when
    that is a module, else a)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def test_packages_import_only_the_layers_below() -> None:
    known = modules()
    found: set[tuple[str, str]] = set()
    for name, path in known.items():
        for imported in imports_of(path, known):
            top, importer = imported.split(".")[0], name.split(".")[0]
            if top in PACKAGES and top != importer and top not in ALLOWED[importer]:
                found.add((path.relative_to(ROOT).as_posix(), top))
    assert sorted(found - KNOWN_VIOLATIONS) == [], "imports against the layers"
    assert sorted(KNOWN_VIOLATIONS - found) == [], "fixed: remove these from KNOWN_VIOLATIONS"


def test_the_offline_verifier_needs_no_database_code() -> None:
    """consent.verify and everything of idgate it imports stay clear of database libraries and the store."""
    known = modules()
    seen: set[str] = set()
    todo = ["consent.verify"]
    problems: list[str] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in imports_of(known[name], known):
            if imported.split(".")[0] in DATABASE_LIBRARIES:
                problems.append(f"{name} imports {imported}")
            if imported in known:
                todo.append(imported)
        parent = name.rpartition(".")[0]
        if parent:  # importing a module runs its package's __init__ first
            todo.append(parent)
    assert problems == []
    # identity.key_files: the rule for key file permissions (standard library only)
    assert seen == {
        "consent",
        "consent.verify",
        "consent.ledger_format",
        "consent.signing",
        "identity",
        "identity.key_files",
    }
