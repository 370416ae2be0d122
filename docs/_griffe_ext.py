"""A griffe extension that adapts fisher_optim's docstrings to Markdown, for mkdocstrings.

The library's docstrings are Google style with a few reStructuredText habits that Markdown
renders badly; this rewrites them in memory only (the source files are not touched):

* Sphinx roles (``:func:`~fisher_optim.x.y```) become code spans (`` `y` ``);
* bare doctest blocks (``>>>`` lines and their output) are fenced as ``pycon`` code, so that
  Markdown neither quotes them (``>``) nor reads ``[a] [b]`` in them as reference links;
* an ``Args:`` entry that documents several parameters at once (``eps, momentum: ...``) is
  split into one entry per parameter, which griffe's Google parser expects.

Loaded by ``mkdocs.yml`` (``extensions: - docs/_griffe_ext.py:DocstringCleanup``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")
ARGS_HEADERS = ("Args:", "Arguments:", "Parameters:", "Params:")
ITEM = re.compile(r"^(\s*)(\w+(?:\s*,\s*\w+)+):(.*)$")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_doctests(text: str) -> str:
    """Wrap every run of lines starting with ``>>>`` (up to the next blank line) in a fence."""
    lines, out, i, in_fence = text.splitlines(), [], 0, False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        pad = " " * _indent(line)
        out.append(f"{pad}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{pad}```")
    return "\n".join(out)


def split_grouped_args(text: str) -> str:
    """``a, b: desc`` inside an ``Args:`` section -> ``a: desc`` and ``b: desc``."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.strip() not in ARGS_HEADERS:
            continue
        section = _indent(line)
        item_indent = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > section):
            if not lines[i].strip():
                # a blank line ends the section unless the next line is still indented
                if i + 1 < len(lines) and lines[i + 1].strip() and _indent(lines[i + 1]) > section:
                    out.append(lines[i])
                    i += 1
                    continue
                break
            if item_indent is None:
                item_indent = _indent(lines[i])
            match = ITEM.match(lines[i]) if _indent(lines[i]) == item_indent else None
            if match is None:
                out.append(lines[i])
                i += 1
                continue
            pad, names, first = match.groups()
            body = [first]
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > item_indent:
                body.append("\n" + lines[i])
                i += 1
            for name in (n.strip() for n in names.split(",")):
                out.append(f"{pad}{name}:{''.join(body)}")
    return "\n".join(out)


def clean(text: str) -> str:
    return split_grouped_args(fence_doctests(ROLE.sub(_role, text)))


class DocstringCleanup(griffe.Extension):
    """Rewrite each docstring as described in the module docstring, before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = clean(obj.docstring.value)
