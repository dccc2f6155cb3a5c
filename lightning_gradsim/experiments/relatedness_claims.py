"""The projection blog's third relatedness claim, checked on a sweep's runs (paired by seed).

The blog (Figure 13, alpha = 0.01): "unweighted cosine and weighted cosine provide better results
than multitask and projection only when the primary task and the auxiliary task are unrelated".

We test it cell by cell (relatedness x lambda x cosine rule). A cosine rule is **better** in a cell
when its main-task test MSE is below *both* multitask (``sum``) and ``projection_alpha0.01`` with
a paired-by-seed t statistic of at least 2 against each (our threshold: the blog shows error bars
and calls its gains "statistically significant" without naming a test). The claim **holds** when

* unrelated: each cosine rule is better in at least half of the lambdas, and
* same and similar: no cosine rule is better at any lambda.

It is checked twice: for the cosine rules measured against the main-gradient EMA with the
blog's alpha = 0.01 (``*_alpha0.01``, our reading of the figure) and for the plain rules (alpha = 1).

Example:

>>> from lightning_gradsim.experiments.relatedness import RunResult
>>> rows = [RunResult("unrelated", m, 1.0, s, 1, 0.0, v + 0.01 * s)
...         for m, v in (("sum", 0.9), ("projection_alpha0.01", 0.9), ("unweighted", 0.8), ("weighted", 0.85))
...         for s in range(3)]
>>> cells = claim3_cells(rows, variant="plain")
>>> [(c.rule, c.better) for c in cells]
[('unweighted', True), ('weighted', True)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Claim3Cell", "claim3_cells", "claim3_holds", "claim3_markdown", "COSINE_VARIANTS", "T_BETTER"]

#: cosine-rule method keys per variant: the blog's alpha = 0.01 (our reading), and alpha = 1.
COSINE_VARIANTS: dict[str, tuple[str, str]] = {
    "alpha0.01": ("unweighted_alpha0.01", "weighted_alpha0.01"),
    "plain": ("unweighted", "weighted"),
}
BASELINES = ("sum", "projection_alpha0.01")
#: paired t statistic needed to call a difference "better" (ours; the blog names no test).
T_BETTER = 2.0


@dataclass(frozen=True)
class Claim3Cell:
    """One relatedness x lambda x cosine rule: paired differences to both baselines."""

    relatedness: str
    lam: float
    rule: str
    n: int
    diff_sum: float  #: mean over seeds of (rule - sum) test MSE
    t_sum: float  #: paired t statistic of that difference (negative: the rule is lower)
    diff_projection: float  #: mean of (rule - projection_alpha0.01)
    t_projection: float

    @property
    def better(self) -> bool:
        """Lower than both baselines with ``t <= -T_BETTER`` against each."""
        return self.t_sum <= -T_BETTER and self.t_projection <= -T_BETTER


def _paired(a: dict[int, float], b: dict[int, float]) -> tuple[int, float, float]:
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n == 0:
        return 0, math.nan, math.nan
    mean = sum(d) / n
    if n < 2:
        return n, mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return n, mean, t


def claim3_cells(results: Sequence, variant: str = "alpha0.01") -> list[Claim3Cell]:
    """Paired comparisons of each cosine rule of ``variant`` with ``sum`` and ``projection_alpha0.01``.

    ``results`` are :class:`~lightning_gradsim.experiments.relatedness.RunResult` rows; cells whose
    methods are missing are left out.
    """
    if variant not in COSINE_VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose from {', '.join(COSINE_VARIANTS)}.")
    table: dict[tuple[str, str, float], dict[int, float]] = {}
    for r in results:
        table.setdefault((r.relatedness, r.method, float(r.lam)), {})[int(r.seed)] = float(r.test_loss)
    cells = []
    settings = sorted({(rel, lam) for rel, _, lam in table}, key=lambda x: (x[0], x[1]))
    for rel, lam in settings:
        base_sum, base_proj = table.get((rel, "sum", lam)), table.get((rel, "projection_alpha0.01", lam))
        if base_sum is None or base_proj is None:
            continue
        for rule in COSINE_VARIANTS[variant]:
            mine = table.get((rel, rule, lam))
            if mine is None:
                continue
            n, d_sum, t_sum = _paired(mine, base_sum)
            _, d_proj, t_proj = _paired(mine, base_proj)
            cells.append(Claim3Cell(rel, lam, rule, n, d_sum, t_sum, d_proj, t_proj))
    return cells


def claim3_holds(cells: Sequence[Claim3Cell]) -> tuple[bool | None, str]:
    """``(held, reason)``; ``held`` is ``None`` when the cells do not cover all three settings."""
    rels = {c.relatedness for c in cells}
    if not {"same", "similar", "unrelated"} <= rels:
        return None, f"needs same, similar and unrelated; the sweep has {sorted(rels)}"
    reasons = []
    ok = True
    for rule in sorted({c.rule for c in cells}):
        unrel = [c for c in cells if c.rule == rule and c.relatedness == "unrelated"]
        wins = sum(c.better for c in unrel)
        if wins * 2 < len(unrel):
            ok = False
            reasons.append(
                f"{rule} is better than both baselines for unrelated tasks at only {wins}/{len(unrel)} lambdas"
            )
        for rel in ("same", "similar"):
            bad = [c for c in cells if c.rule == rule and c.relatedness == rel and c.better]
            if bad:
                ok = False
                lams = ", ".join(f"{c.lam:g}" for c in bad)
                reasons.append(f"{rule} is also better than both for {rel} tasks (lambda {lams})")
    return ok, "; ".join(reasons) if reasons else "every condition met"


def claim3_markdown(results: Sequence) -> str:
    """The claim-3 report: one table per variant and the verdicts."""
    lines = [
        "Blog claim 3 (Figure 13, alpha = 0.01): the cosine rules beat multitask and projection "
        "only when the tasks are unrelated.",
        "",
        f"Cells: mean paired difference of main-task test MSE (rule - baseline) and its t statistic; "
        f"'better' = below both with t <= -{T_BETTER:g}.",
    ]
    for variant, label in (
        ("alpha0.01", "cosine measured against the EMA M(t), alpha = 0.01 (our reading)"),
        ("plain", "cosine against this step's main gradient (alpha = 1, as in Du et al.)"),
    ):
        cells = claim3_cells(results, variant)
        if not cells:
            continue
        lines += [
            "",
            f"### {label}",
            "",
            "| relatedness | lambda | rule | seeds | - sum (t) | - projection a=0.01 (t) | better |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in cells:
            lines.append(
                f"| {c.relatedness} | {c.lam:g} | {c.rule} | {c.n} | {c.diff_sum:+.4f} ({c.t_sum:+.1f}) | "
                f"{c.diff_projection:+.4f} ({c.t_projection:+.1f}) | {'yes' if c.better else 'no'} |"
            )
        held, reason = claim3_holds(cells)
        verdict = "not decided" if held is None else "HELD" if held else "NOT HELD"
        lines += ["", f"**Verdict ({variant}): {verdict}** - {reason}."]
    return "\n".join(lines) + "\n"
