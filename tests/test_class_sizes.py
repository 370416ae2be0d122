"""No class of the package is over 300 lines, docstrings included: a class that grows past
that holds more than one concept, and its parts go into functions or small helper classes
beside it (as the finite-difference schedule, the penalty-gradient cache and the batch
checks of the optimizers do)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fisher_optim"
MAX_LINES = 300


def class_spans() -> list[tuple[int, str]]:
    """``(lines, "path:line Name")`` of every class, decorators and docstring included."""
    spans = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                spans.append((node.end_lineno - start + 1, where))
    return spans


def test_no_class_is_over_the_limit():
    spans = class_spans()
    assert len(spans) > 20  # the walk found the package's classes
    over = [f"{where}: {n} lines" for n, where in spans if n > MAX_LINES]
    assert not over, f"classes over {MAX_LINES} lines: " + "; ".join(over)
