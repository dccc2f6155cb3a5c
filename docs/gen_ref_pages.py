"""Build-time pages (mkdocs-gen-files): the API reference from the package tree, and the changelog.

One page per public module (a module or package whose dotted path has no ``_``-prefixed part),
each rendered by mkdocstrings from the docstrings. The nav (``reference/SUMMARY.md``, read by
mkdocs-literate-nav) follows the tree, in three groups:

* **Public API**: the packages a user imports (:data:`PUBLIC`). A package that exports names lazily
  (``_EXPORTS``, PEP 562) gets one section per such name after its docstring, so
  ``lightning_gradsim.GradientGate`` is documented on the package's page where a reader looks for it;
* **Internals**: every module of the packages that make up the library (:data:`INTERNAL`), grouped
  under its package (``core/``, ``parallel/``, ``lightning/``, ...);
* **Experiments, data, baselines**: everything else (the paper's commands, datamodules, models, CLI).

Added, moved or removed modules need no edit here or in ``mkdocs.yml``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lightning_gradsim"
#: The public API, in the order a reader meets it.
PUBLIC = ("", "rules", "loss_weighting", "methods", "parallel")
#: The packages of the library itself, whose modules are listed under "Internals".
INTERNAL = ("core", "parallel", "lightning", "rules", "loss_weighting")


def public_modules(package_dir: Path) -> list[tuple[str, ...]]:
    """Dotted paths (as tuples) of the public modules under ``package_dir``, sorted."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        if any(part.startswith("_") for part in parts):
            continue
        out.append(parts)
    return out


def source_of(parts: tuple[str, ...]) -> Path:
    """The file that defines the module ``parts``."""
    package = ROOT.joinpath(*parts) / "__init__.py"
    return package if package.is_file() else ROOT.joinpath(*parts).with_suffix(".py")


def lazy_names(source: Path) -> list[str]:
    """The names a module exports lazily: the keys of its ``_EXPORTS = {...}`` dict, in order."""
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and isinstance(node.value, ast.Dict):
            return [key.value for key in node.value.keys if isinstance(key, ast.Constant)]
    return []


def doc_path(parts: tuple[str, ...]) -> str:
    """The page of the module ``parts``, relative to ``reference/``."""
    is_package = source_of(parts).name == "__init__.py"
    return (Path(*parts, "index.md") if is_package else Path(*parts).with_suffix(".md")).as_posix()


def write_page(parts: tuple[str, ...]) -> None:
    """The module's page: its docstring and public members, then its lazily exported names."""
    dotted = ".".join(parts)
    with mkdocs_gen_files.open(Path("reference", doc_path(parts)), "w") as page:
        page.write(f"::: {dotted}\n")
        for name in lazy_names(source_of(parts)):
            page.write(f"\n::: {dotted}.{name}\n    options:\n      heading_level: 2\n")
    mkdocs_gen_files.set_edit_path(Path("reference", doc_path(parts)), source_of(parts).relative_to(ROOT))


def grouped(modules: list[tuple[str, ...]]) -> list[str]:
    """The literate-nav lines of the three groups (see the module docstring)."""
    public = [(PACKAGE, *name.split(".")) if name else (PACKAGE,) for name in PUBLIC]
    lines = ["* Public API\n"]
    lines += [f"    * [{parts[-1]}]({doc_path(parts)})\n" for parts in public if parts in modules]
    lines.append("* Internals\n")
    for package in INTERNAL:
        inside = [parts for parts in modules if parts[1:2] == (package,) and parts not in public]
        if inside:
            lines.append(f"    * {package}/\n")
            lines += [f"        * [{'.'.join(parts[2:]) or package}]({doc_path(parts)})\n" for parts in inside]
    lines.append("* Experiments, data, baselines\n")
    rest = [parts for parts in modules if len(parts) > 1 and parts[1] not in INTERNAL and parts not in public]
    lines += [f"    * [{'.'.join(parts[1:])}]({doc_path(parts)})\n" for parts in rest]
    return lines


modules = public_modules(ROOT / PACKAGE)
for parts in modules:
    write_page(parts)
with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(grouped(modules))

with mkdocs_gen_files.open("changelog.md", "w") as changelog:
    changelog.write((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))
