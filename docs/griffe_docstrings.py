"""Griffe extension for the API reference: this package's docstrings, as Markdown.

The docstrings are written for ``pydoc`` and doctest: ``>>>`` examples at the left margin and
Sphinx roles (``:class:`~lightning_gradsim.GradientGate```). Markdown would render the examples
as nested quotes and the roles as text, so, before mkdocstrings renders a docstring, this extension

* fences each block of ``>>>`` lines (with its ``...`` and output lines, up to a blank line) as
  ``pycon`` code: the examples the site shows are exactly those the doctests run;
* turns a role whose target is a ``lightning_gradsim.`` path into a cross-reference (a target that
  no page documents fails ``mkdocs build --strict``), and any other role into inline code;
* gives each field of a class (a ``NamedTuple``'s, a dataclass's) that has no docstring of its own the
  description its class's ``Attributes:`` section gives it, so the field's own entry on the page says
  what it is, not only its type; a field documented by ``#:`` comment lines above it (Sphinx's
  convention, used in this package) gets those; a subclass's override of a field, its base's.
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


_HEADER = re.compile(r"^\S.*\battributes\b.*:$", re.I)
_FIELD = re.compile(r"^    (\w+)(?: \([^)]*\))?: (.*)$")


def listed_fields(text: str) -> dict[str, str]:
    """``name: description`` entries under a header line naming attributes (``Settings (... attributes):``).

    An entry is indented by four spaces and continues on more-indented lines; the section ends at the
    first line indented less.
    """
    out: dict[str, str] = {}
    name = None
    inside = False
    for line in text.splitlines():
        if _HEADER.match(line):
            inside, name = True, None
            continue
        if not inside:
            continue
        match = _FIELD.match(line)
        if match:
            name = match.group(1)
            out[name] = match.group(2)
        elif name is not None and line.startswith("     "):
            out[name] += " " + line.strip()
        else:
            inside, name = False, None
    return out


def field_descriptions(cls: griffe.Class) -> dict[str, str]:
    """Name -> description of the fields ``cls``'s docstrings describe.

    From the class docstring's ``Attributes:`` section and any section whose title names attributes
    (``Settings (class or instance attributes):``), then, for an attribute that stores a constructor
    argument, its ``Args:`` and ``__init__``'s.
    """
    found: dict[str, str] = {}
    sources = [cls.docstring]
    init = cls.members.get("__init__")
    if init is not None and not init.is_alias:
        sources.append(init.docstring)
    for docstring in sources:
        if docstring is None:
            continue
        for section in docstring.parse(griffe.Parser.google, warnings=False):
            kind = section.kind
            if kind in (griffe.DocstringSectionKind.attributes, griffe.DocstringSectionKind.parameters):
                for field in section.value:
                    found.setdefault(field.name, field.description)
        for name, text in listed_fields(docstring.value).items():
            found.setdefault(name, text)
    return found


def describe_fields(cls: griffe.Class) -> None:
    """Give each undocumented attribute of ``cls`` the description its class's docstrings give it."""
    descriptions = field_descriptions(cls)
    for name, text in descriptions.items():
        member = cls.members.get(name)
        if text and member is not None and not member.is_alias and member.is_attribute and member.docstring is None:
            member.docstring = griffe.Docstring(text, parent=member)


def comment_docstring(attr: griffe.Attribute) -> str | None:
    """The ``#:`` comment lines right above ``attr``'s assignment (Sphinx's attribute comments), or ``None``."""
    try:
        lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        return None
    found: list[str] = []
    number = (attr.lineno or 0) - 2  # 0-based index of the line above
    while number >= 0 and lines[number].strip().startswith("#:"):
        found.insert(0, lines[number].strip()[2:].strip())
        number -= 1
    return " ".join(found) or None


def inherit_descriptions(cls: griffe.Class) -> None:
    """An attribute a subclass overrides without a description gets its base class's description."""
    for name, member in cls.members.items():
        if member.is_alias or not member.is_attribute or member.docstring is not None:
            continue
        try:
            bases = cls.mro()
        except Exception:  # a base outside the package: nothing to inherit here
            continue
        for base in bases:
            inherited = base.members.get(name)
            if inherited is not None and not inherited.is_alias and inherited.docstring is not None:
                member.docstring = griffe.Docstring(inherited.docstring.value, parent=member)
                break


def _classes(obj: griffe.Object) -> Any:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_class:
            yield member
        if member.is_class or member.is_module:
            yield from _classes(member)


class DocstringsAsMarkdown(griffe.Extension):
    """Rewrite every docstring with :func:`to_markdown`; describe every field (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
        elif isinstance(obj, griffe.Attribute):
            text = comment_docstring(obj)
            if text is not None:
                obj.docstring = griffe.Docstring(to_markdown(text), parent=obj)

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        describe_fields(cls)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for cls in _classes(pkg):
            inherit_descriptions(cls)
