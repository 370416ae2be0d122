"""Where each name lives: public names in public modules, each defined in one module.

Read from the source (no imports): every ``from fisher_optim.M import name`` in the package,
the tests and the benchmarks names the module that defines ``name``, or a package face (an
``__init__.py``: ``fisher_optim``, ``fisher_optim.curvature``) that exports it. A module that
is not a face re-exports nothing (its ``__all__`` lists only its own names, and every name it
imports from the package it uses). The faces export only names of public modules, the API
reference renders no private module, and ``benchmarks/`` imports nothing private.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fisher_optim"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Every module of the package, by dotted name.
MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_face(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def is_private(module: str) -> bool:
    return any(p.startswith("_") and not p.endswith("__") for p in module.split("."))


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements at module level, looking into ``if``/``try``/``with`` blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.With):
            yield from _top_level(node.body)
            yield from _top_level(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
            yield from _top_level(node.finalbody)
            for handler in node.handlers:
                yield from _top_level(handler.body)


def defined(module: str) -> set[str]:
    """Names a module binds itself (``def``, ``class``, assignments), not by import."""
    names: set[str] = set()
    for node in _top_level(_tree(MODULES[module]).body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def exported(module: str) -> list[str]:
    """A module's ``__all__`` (empty if it has none)."""
    for node in _tree(MODULES[module]).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return []


def package_imports(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from <fisher_optim module> import name`` in a file."""
    here = _module_name(path) if path.is_relative_to(PACKAGE) else None
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = node.module or ""
        if node.level:
            if here is None:
                continue
            package = here if path.name == "__init__.py" else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            source = f"{package}.{source}" if source else package
        if source == "fisher_optim" or source.startswith("fisher_optim."):
            for alias in node.names:
                yield node.lineno, source, alias.name


def _sources() -> list[Path]:
    return [
        p
        for folder in ("fisher_optim", "tests", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))
    ]


def test_every_import_names_the_module_that_defines_the_name():
    wrong = []
    for path in _sources():
        for line, source, name in package_imports(path):
            if source not in MODULES:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: no module {source}")
            elif f"{source}.{name}" in MODULES:
                continue  # a submodule
            elif is_face(source):
                if name not in exported(source):
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {source} exports no {name}")
            elif name not in defined(source):
                owner = [m for m in MODULES if not is_face(m) and name in defined(m)]
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} from {source}, defined in {owner}"
                )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", [m for m in MODULES if not is_face(m)])
def test_a_module_reexports_nothing(module):
    tree = _tree(MODULES[module])
    assert set(exported(module)) <= defined(module), set(exported(module)) - defined(module)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imported = {name for _, _, name in package_imports(MODULES[module])}
    unused = {n for n in imported - used if f"{module}.{n}" not in MODULES}
    assert not unused, f"{module} imports {sorted(unused)} without using them (a re-export)"


@pytest.mark.parametrize("face", [m for m in MODULES if is_face(m)])
def test_a_package_face_exports_names_of_public_modules(face):
    for _, source, name in package_imports(MODULES[face]):
        if name in exported(face):
            assert not is_private(source), f"{face} exports {name} from the private {source}"
    assert set(exported(face)) <= defined(face) | {
        name for _, _, name in package_imports(MODULES[face])
    }


def test_benchmarks_import_nothing_private():
    private = re.compile(r"\bfisher_optim(?:\.[A-Za-z]\w*)*\._[A-Za-z]")
    found = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in sorted((ROOT / "benchmarks").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_api_reference_renders_no_private_module():
    rendered = re.compile(r"^:::\s*(\S+)", re.MULTILINE)
    for path in sorted((ROOT / "docs").rglob("*.md")):
        for target in rendered.findall(path.read_text()):
            assert not is_private(target), f"{path.relative_to(ROOT)} renders {target}"
