"""The docs site (`mkdocs build --strict`) and the doctest collection rule (conftest.py at the root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# mkdocs-material and the plugins print a banner about MkDocs 2.0; it says nothing about this site
QUIET = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def _mkdocs(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_gen_files", "mkdocs_literate_nav"):
        pytest.importorskip(module, reason="the docs extra (in dev) installs the site's tools")
    return subprocess.run([sys.executable, "-m", "mkdocs", *args], cwd=cwd, env=QUIET, capture_output=True, text=True)


def _public_modules() -> list[str]:
    """Dotted names of the package's modules with no ``_``-prefixed part (a package is its ``__init__``)."""
    names = []
    for path in (REPO / "lightning_gradsim").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return sorted(names)


@pytest.mark.slow
def test_docs_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    sources = sorted((REPO / "docs").rglob("*"))
    proc = _mkdocs("build", "--strict", "--site-dir", str(site))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert sorted((REPO / "docs").rglob("*")) == sources, "the generated pages are virtual, not written to docs/"
    # every hand-written page, the generated changelog, and one reference page per public module
    pages = [p.relative_to(REPO / "docs").with_suffix("") for p in (REPO / "docs").rglob("*.md")]
    for page in [*pages, Path("changelog")]:
        built = site / page / "index.html" if page.name != "index" else site / page.parent / "index.html"
        assert built.is_file(), page
    modules = _public_modules()
    assert {"lightning_gradsim", "lightning_gradsim.configs", "lightning_gradsim.rules"} <= set(modules)
    for module in modules:
        path = site / "reference" / Path(*module.split(".")) / "index.html"
        assert f'id="{module}"' in path.read_text(), module  # the module's own anchor (cross-references)
    # the docstring examples are shown as code, the same lines the doctests run
    configs = (site / "reference" / "lightning_gradsim" / "configs" / "index.html").read_text()
    assert '<span class="gp">&gt;&gt;&gt; </span><span class="n">resolve_config_args</span>' in configs
    assert "<blockquote>" not in configs
    # the formulas are MathJax input
    assert r'<span class="arithmatex">\(g_0 + \sum_k \lambda_k' in (site / "rules" / "index.html").read_text()
    # the API reference: public API first, the internals grouped under their package; GateStats's fields described
    home = (site / "reference" / "lightning_gradsim" / "index.html").read_text()
    assert home.index("Public API") < home.index("Internals") < home.index("Experiments, data, baselines")
    assert 'id="lightning_gradsim.GradientGate"' in home and 'id="lightning_gradsim.GateStats"' in home
    stats = (site / "reference" / "lightning_gradsim" / "core" / "stats" / "index.html").read_text()
    field = stats[stats.index('id="lightning_gradsim.core.stats.GateStats.finite"') :]  # after the summary table
    assert "whether the step was finite" in field[: field.index("</article>")]
    # the pictures a reader would rather look at than read
    for page, image in (("table1", "error_vs_angle.png"), ("table1", "cosine.png")):
        assert f'src="{image}"' in (site / page / "index.html").read_text()  # docs/<page>/<image>: beside the page
        assert (site / page / image).is_file()


def test_strict_build_fails_on_a_broken_link_a_missing_page_and_an_orphan(tmp_path):
    """The validation settings of mkdocs.yml, on a two-page site (the plugins left out: fast)."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[a page that is not there](nowhere.md)\n")
    (docs / "orphan.md").write_text("# Reached by no nav entry and no link\n")
    config.update(
        docs_dir=str(docs),
        site_dir=str(tmp_path / "site"),
        plugins=["search"],
        extra_javascript=[],
        nav=[{"Home": "index.md"}, {"Gone": "missing.md"}],
    )
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = _mkdocs("build", "--strict", cwd=tmp_path)
    assert proc.returncode != 0
    assert "nowhere.md" in proc.stderr and "missing.md" in proc.stderr and "orphan.md" in proc.stderr
    (docs / "index.md").write_text("# Home\n\n[the other page](orphan.md)\n")
    config["nav"] = [{"Home": "index.md"}, {"Other": "orphan.md"}]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    assert _mkdocs("build", "--strict", cwd=tmp_path).returncode == 0  # the fixed site passes


def test_docstring_markdown_extension():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from griffe_docstrings import to_markdown
    finally:
        sys.path.remove(str(REPO / "docs"))
    text = "Use :class:`~lightning_gradsim.rules.Rule` or :meth:`backward`.\n\n>>> [1, 0]\n[1, 0]\n\nAfter."
    assert to_markdown(text) == (
        "Use [`Rule`][lightning_gradsim.rules.Rule] or `backward`.\n\n```pycon\n>>> [1, 0]\n[1, 0]\n```\n\nAfter."
    )
    fenced = "```python\n>>> not a doctest block here\n```"
    assert to_markdown(fenced) == fenced


def test_every_public_field_is_described():
    """With the docs' griffe extension, each field of the public classes has a description on its page."""
    griffe = pytest.importorskip("griffe", reason="the docs extra (in dev) installs the site's tools")
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from griffe_docstrings import DocstringsAsMarkdown
    finally:
        sys.path.remove(str(REPO / "docs"))
    package = griffe.load(
        "lightning_gradsim",
        search_paths=[str(REPO)],
        extensions=griffe.load_extensions(DocstringsAsMarkdown()),
        docstring_parser="google",
    )
    classes = {
        "core.stats.GateStats": "the cosine the rule used",  # Attributes: section
        "lightning.mixin.GradSimMixin": "clip the combined gradient",  # "Settings (... attributes):"
        "rules.base.Rule": "direction vector",  # #: comments
        "rules.summed.Sum": "per-task statistics",  # inherited from Rule
        "rules.base.RuleInput": "dot products",
        "parallel.registry.SyncMode": "concatenated batch",
        "parallel.registry.SyncSettings": "gradsim_sync",
        "core.loss_weighting.LossWeighting": "prior lambda",
    }
    for path, some_text in classes.items():
        cls = package[path]
        fields = {name: m for name, m in cls.members.items() if not name.startswith("_") and m.is_attribute}
        fields.pop("automatic_optimization", None)  # Lightning's property, documented by Lightning
        fields.pop("gradsim_last_step_skipped", None)  # documented in the class's text, not as a field
        undescribed = [name for name, m in fields.items() if m.docstring is None or not m.docstring.value.strip()]
        assert fields and not undescribed, (path, undescribed)
        assert any(some_text in m.docstring.value for m in fields.values()), path


def test_doctests_of_modules_with_a_missing_optional_dependency_are_not_collected(tmp_path):
    """The root conftest.py's rule, on a stand-in package: a module whose optional dependency is missing is
    left out and named; one that lacks a package that is not optional is a collection error."""
    shutil.copy(REPO / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = lightning_gradsim\naddopts = --doctest-modules\n")
    package = tmp_path / "lightning_gradsim"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plain.py").write_text('"""\n>>> 1 + 1\n2\n"""\n')
    (package / "needs_gym.py").write_text('"""\n>>> 1\n1\n"""\nimport gymnasium\n')
    (tmp_path / "gymnasium").mkdir()  # stands for a missing gymnasium, whether or not it is installed here
    (tmp_path / "gymnasium" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'gymnasium'\", name='gymnasium')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert "doctests not collected, optional dependency missing: lightning_gradsim.needs_gym (needs gymnasium)" in (
        proc.stdout
    )
    (package / "needs_typo.py").write_text("import not_a_known_extra_package\n")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "not_a_known_extra_package" in proc.stdout


@pytest.mark.parametrize("page", ["README.md", "docs/usage.md"])
def test_the_without_lightning_example_skips_a_non_finite_step(page):
    """The page's "Without Lightning" training step runs as written, and a NaN loss leaves the weights alone."""
    import re

    import torch

    from lightning_gradsim import GradientGate

    text = (REPO / page).read_text()
    start = text.index("Without Lightning")
    code = re.search(r"```python\n(.*?)```", text[start:], flags=re.S).group(1)
    assert "if stats.finite:" in code and code.index("if stats.finite:") < code.index("optimizer.step()")
    code = code.split("update, stats = gate.combine")[0]  # the step (combine is shown for other vectors)
    for poison, moves in ((1.0, True), (float("nan"), False)):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.trunk = torch.nn.Linear(3, 3)
        x = torch.randn(4, 3)
        before = [p.detach().clone() for p in model.trunk.parameters()]
        scope = {
            "GradientGate": GradientGate,
            "model": model,
            "main_loss": model.trunk(x).pow(2).mean(),
            "aux_loss": model.trunk(x).sum() * poison,
            "optimizer": torch.optim.SGD(model.trunk.parameters(), lr=0.1),
        }
        exec(compile(code, page, "exec"), scope)
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.trunk.parameters()))
        assert moved == moves
        assert all(torch.isfinite(p).all() for p in model.trunk.parameters())
