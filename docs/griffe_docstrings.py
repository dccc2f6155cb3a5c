"""Griffe extension for the API reference: this package's docstrings, as Markdown.

The docstrings are written for ``pydoc`` and doctest: ``>>>`` examples at the left margin and
Sphinx roles (``:class:`~lightning_gradsim.GradientGate```). Markdown would render the examples
as nested quotes and the roles as text, so, before mkdocstrings renders a docstring, this extension

* fences each block of ``>>>`` lines (with its ``...`` and output lines, up to a blank line) as
  ``pycon`` code: the examples the site shows are exactly those the doctests run;
* turns a role whose target is a ``lightning_gradsim.`` path into a cross-reference (a target that
  no page documents fails ``mkdocs build --strict``), and any other role into inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    shown = target.rsplit(".", 1)[-1] if short else target
    if target.startswith("lightning_gradsim."):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


def fence_doctests(text: str) -> str:
    """Wrap each left-margin ``>>>`` block of ``text`` in a ``pycon`` fence."""
    out: list[str] = []
    in_block = in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and not in_block and line.startswith(">>>"):
            out.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            out.append("```")
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its examples fenced and its roles converted (outside the examples)."""
    parts = re.split(r"(```pycon\n.*?\n```)", fence_doctests(text), flags=re.S)
    return "".join(part if part.startswith("```pycon") else _ROLE.sub(_role, part) for part in parts)


class DocstringsAsMarkdown(griffe.Extension):
    """Rewrite every object's docstring with :func:`to_markdown` when it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
