"""Build-time pages (mkdocs-gen-files): the API reference from the package tree, and the changelog.

One page per public module (a module or package whose dotted path has no ``_``-prefixed part),
each rendered by mkdocstrings from the docstrings; the nav comes from the same walk
(``reference/SUMMARY.md``, read by mkdocs-literate-nav), so added, moved or removed modules need
no edit here or in ``mkdocs.yml``.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lightning_gradsim"


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


nav = mkdocs_gen_files.Nav()
for parts in public_modules(ROOT / PACKAGE):
    is_package = (ROOT.joinpath(*parts) / "__init__.py").is_file()
    doc_path = Path(*parts, "index.md") if is_package else Path(*parts).with_suffix(".md")
    nav[parts] = doc_path.as_posix()
    with mkdocs_gen_files.open(Path("reference", doc_path), "w") as page:
        page.write(f"::: {'.'.join(parts)}\n")
    source = ROOT.joinpath(*parts) / "__init__.py" if is_package else ROOT.joinpath(*parts).with_suffix(".py")
    mkdocs_gen_files.set_edit_path(Path("reference", doc_path), source.relative_to(ROOT))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())

with mkdocs_gen_files.open("changelog.md", "w") as changelog:
    changelog.write((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))
