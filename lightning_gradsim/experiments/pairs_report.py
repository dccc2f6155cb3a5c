"""Outputs of ``gradsim pairs``: ``curves.csv``, ``cosine_steps.csv``, ``figure3.png``, ``summary.md``.

Measures (fixed before any run; see docs/pairs.md):

* *early accuracy*: a run's mean test accuracy over the evaluations in the first quarter of
  training (step 0 excluded) -- the paper's "initial boost"; *final accuracy*: at the last step.
  Differences to single-task (``main_only``) are paired by seed.
* *cosine*: the per-step cosine between the main and auxiliary gradients on the shared
  parameters, from the multi-task (``sum``) runs, as in the paper's Figure 3(a). ``curves.csv``
  holds its mean over each evaluation interval.
* *gate*: for each gated method (not ``main_only``/``sum``) the fraction of steps the gate was
  open per quarter of training, and the *switch-off step*: the end of the last evaluation interval
  in which the gate was open on at least half of the steps (``never`` when that is the last one).

Example::

    summary = write_outputs(result, "runs/pairs", config, choice, start_time)
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .csv_rows import write_csv

__all__ = ["write_outputs", "summarize", "draw_figure3", "switch_off_step"]

BASELINES = ("main_only", "sum")
STYLES = {"main_only": ":", "sum": "--", "unweighted": "-"}
LABELS = {"main_only": "single-task (main_only)", "sum": "multi-task (sum)", "unweighted": "gate (unweighted)"}


def _series(rows: Sequence[dict[str, Any]], key: str) -> dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]]:
    """``(kind, method, seed) -> (steps, values)`` of ``key`` (missing values dropped)."""
    out: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            out[(r["kind"], r["method"], int(r["seed"]))].append((int(r["step"]), float(r[key])))
    return {k: (np.array([s for s, _ in sorted(v)]), np.array([x for _, x in sorted(v)])) for k, v in out.items()}


def _ms(values: Sequence[float], scale: float = 1.0) -> str:
    v = np.asarray(values, float) * scale
    if np.isnan(v).any():
        return "-"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def switch_off_step(steps: np.ndarray, open_fraction: np.ndarray) -> int | None:
    """End of the last evaluation interval with the gate open on >= half of its steps (0 if none);
    ``None`` ("never") when that interval is the last one."""
    on = np.flatnonzero(open_fraction >= 0.5)
    if len(on) == 0:
        return 0
    return None if on[-1] == len(steps) - 1 else int(steps[on[-1]])


def _cosine_method(methods: Sequence[str]) -> str:
    return "sum" if "sum" in methods else methods[0]


def summarize(rows: list[dict[str, Any]], step_rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The numbers of ``summary.md`` (see the module docs) as a dict."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    acc = _series(rows, "test_accuracy")
    early_end = steps / 4
    out: dict[str, Any] = {"kinds": kinds, "methods": methods, "seeds": seeds, "accuracy": {}, "cosine": {}, "gate": {}}
    for kind in kinds:
        for m in methods:
            early, final = [], []
            for s in seeds:
                st, v = acc[(kind, m, s)]
                sel = (st > 0) & (st <= early_end)
                early.append(float(v[sel].mean()) if sel.any() else float("nan"))
                final.append(float(v[-1]))
            out["accuracy"][(kind, m)] = {"early": early, "final": final}
    cos_method = _cosine_method(methods)
    out["cosine_method"] = cos_method
    per_step = _series([r for r in step_rows if r["method"] == cos_method], "cosine")
    for kind in kinds:
        curves = [per_step[(kind, cos_method, s)][1] for s in seeds]
        half = len(curves[0]) // 2
        out["cosine"][kind] = {
            "mean": [float(c.mean()) for c in curves],
            "first_half": [float(c[:half].mean()) for c in curves] if half else [float("nan")] * len(curves),
            "second_half": [float(c[half:].mean()) for c in curves],
            "negative": [float((c < 0).mean()) for c in curves],
        }
    if len(kinds) == 2 and {"near", "far"} <= set(kinds):
        interval = _series([r for r in rows if r["method"] == cos_method], "cosine")
        near = np.mean([interval[("near", cos_method, s)][1] for s in seeds], 0)
        far = np.mean([interval[("far", cos_method, s)][1] for s in seeds], 0)
        out["separation"] = {
            "seeds_near_above_far": sum(
                n > f for n, f in zip(out["cosine"]["near"]["mean"], out["cosine"]["far"]["mean"])
            ),
            "intervals_near_above_far": float((near > far).mean()),
        }
    opened = _series(rows, "open_fraction")
    step_open = _series(step_rows, "gate_open")
    for kind in kinds:
        for m in methods:
            if m in BASELINES:
                continue
            quarters = []
            for s in seeds:
                st, v = step_open[(kind, m, s)]
                quarters.append([float(q.mean()) if len(q) else float("nan") for q in np.array_split(v, 4)])
            out["gate"][(kind, m)] = {
                "quarters": np.mean(quarters, 0).tolist(),
                "switch_off": [switch_off_step(*opened[(kind, m, s)]) for s in seeds],
            }
    return out


def _markdown(stats: dict[str, Any], result: Any, config: dict[str, Any], choice: Any, wall: float) -> str:
    lines = ["# gradsim pairs: Figure 3 on a near and a far class pair", ""]
    for pair in result.pairs:
        lines.append(
            f"* **{pair.kind}** pair: main '{pair.main_name}' vs auxiliary '{pair.aux_name}' "
            f"({len(pair.main)} main / {len(pair.aux)} auxiliary training images, {len(pair.test)} test images)"
        )
    for note in result.notes:
        lines.append(f"* {note}")
    if choice is not None:
        ranked = choice.ranked()
        fmt = ", ".join
        lines.append(
            f"* pairs picked by the Fréchet distance of `{choice.features}` class features (not the paper's "
            f"Inception/ResNetV2 embedding): near = smallest distance, far = largest. Nearest: "
            f"{fmt(f'{a}/{b} {d:.2f}' for (a, b), d in ranked[:3])}; "
            f"farthest: {fmt(f'{a}/{b} {d:.2f}' for (a, b), d in ranked[-3:])}"
        )
    lines.append("* settings: " + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None))
    lines += [
        "",
        "## Main-task test accuracy (%), mean ± std over seeds",
        "",
        "early = mean over the evaluations in the first quarter of training; final = last step; "
        "Δ = paired by seed against single-task (`main_only`), with the number of seeds where it is > 0.",
        "",
        "| pair | method | early | final | Δ early | Δ final |",
        "|---|---|---|---|---|---|",
    ]
    methods = stats["methods"]
    for kind in stats["kinds"]:
        base = stats["accuracy"].get((kind, "main_only"))
        for m in methods:
            a = stats["accuracy"][(kind, m)]
            if base is None or m == "main_only":
                de = dfin = "-"
            else:
                e = np.subtract(a["early"], base["early"])
                f = np.subtract(a["final"], base["final"])
                de, dfin = (
                    f"{_ms(e, 100)} ({int((e > 0).sum())}/{len(e)})",
                    f"{_ms(f, 100)} ({int((f > 0).sum())}/{len(f)})",
                )
            lines.append(f"| {kind} | {m} | {_ms(a['early'], 100)} | {_ms(a['final'], 100)} | {de} | {dfin} |")
    lines += _glance(result.rows, methods, stats["cosine_method"])
    cm = stats["cosine_method"]
    lines += [
        "",
        f"## Cosine of the main and auxiliary gradients on the shared parameters (`{cm}` runs)",
        "",
        "| pair | mean over training | first half | second half | steps with cosine < 0 |",
        "|---|---|---|---|---|",
    ]
    for kind in stats["kinds"]:
        c = stats["cosine"][kind]
        lines.append(
            f"| {kind} | {_ms(c['mean'])} | {_ms(c['first_half'])} | {_ms(c['second_half'])} "
            f"| {_ms(c['negative'], 100)} % |"
        )
    if "separation" in stats:
        sep = stats["separation"]
        lines.append(
            f"\nNear above far: in {sep['seeds_near_above_far']}/{len(stats['seeds'])} seeds (mean over training), "
            f"and in {100 * sep['intervals_near_above_far']:.0f} % of the evaluation intervals (mean over seeds)."
        )
    if stats["gate"]:
        lines += [
            "",
            "## The gate",
            "",
            "open = fraction of steps on which the auxiliary gradient was used, "
            "per quarter of training (mean over seeds); "
            "switch-off = end of the last evaluation interval with the gate open on at least half of its steps.",
            "",
            "| pair | method | open, quarters 1-4 | switch-off step per seed |",
            "|---|---|---|---|",
        ]
        for (kind, m), g in stats["gate"].items():
            q = " / ".join("-" if math.isnan(v) else f"{100 * v:.0f} %" for v in g["quarters"])
            so = ", ".join("never" if s is None else str(s) for s in g["switch_off"])
            lines.append(f"| {kind} | {m} | {q} | {so} |")
    n_runs = len({(r["kind"], r["method"], r["seed"]) for r in result.rows})
    lines += [
        "",
        "Wall time of the command from argument parsing to the last file (data, pair picking, training, "
        f"outputs; Python start-up and imports not included): {wall:.0f} s.",
        f"Training all {n_runs} runs together: {result.seconds:.0f} s.",
        "",
        "Files: `curves.csv`, `cosine_steps.csv`, `figure3.png`, `summary.md`.",
    ]
    return "\n".join(lines) + "\n"


def _glance(rows: list[dict[str, Any]], methods: Sequence[str], cos_method: str) -> list[str]:
    """The curves at a glance: the first five evaluations and the ones at 40/60/80/100 % of training."""
    steps = sorted({int(r["step"]) for r in rows} - {0})
    if not steps:
        return []
    marks = {steps[min(max(0, int(np.searchsorted(steps, k * steps[-1] / 5))), len(steps) - 1)] for k in (2, 3, 4, 5)}
    picked = sorted(set(steps[:5]) | marks)
    gated = [m for m in methods if m not in BASELINES]
    acc, cos, opened = _series(rows, "test_accuracy"), _series(rows, "cosine"), _series(rows, "open_fraction")

    def at(data: dict, kind: str, m: str, step: int) -> float:
        vals = [v[list(st).index(step)] for (k, mm, _), (st, v) in data.items() if k == kind and mm == m and step in st]
        return float(np.mean(vals)) if vals else float("nan")

    head = ["pair", "step"] + [f"acc {m}" for m in methods] + [f"cosine ({cos_method})"] + [f"open {m}" for m in gated]
    lines = [
        "",
        "### The curves at a glance "
        "(mean over seeds; cosine and open fraction: mean over the interval ending at the step)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        for step in picked:
            cells = [kind, str(step)] + [f"{100 * at(acc, kind, m, step):.1f}" for m in methods]
            cells += [f"{at(cos, kind, cos_method, step):+.3f}"] + [
                f"{100 * at(opened, kind, m, step):.0f} %" for m in gated
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def draw_figure3(rows: list[dict[str, Any]], path: Path, pairs: Sequence[Any]) -> None:
    """(a) cosine over training, near vs far (``sum`` runs); (b, c) test accuracy per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    names = {p.kind: p.label for p in pairs}
    cm = _cosine_method(methods)
    cos, acc = _series(rows, "cosine"), _series(rows, "test_accuracy")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))

    def band(ax: Any, data: dict, key_fn: Any, **kw: Any) -> None:
        st = data[key_fn(seeds[0])][0]
        v = np.stack([data[key_fn(s)][1] for s in seeds])
        mean, sd = v.mean(0), (v.std(0, ddof=1) if len(seeds) > 1 else np.zeros(v.shape[1]))
        line = ax.plot(st, mean, **kw)[0]
        ax.fill_between(st, mean - sd, mean + sd, color=line.get_color(), alpha=0.18, linewidth=0)

    for kind, color in (("near", "tab:blue"), ("far", "tab:red")):
        if any(k[0] == kind for k in cos):
            band(axes[0], cos, lambda s, k=kind: (k, cm, s), color=color, label=f"{kind}: {names.get(kind, '')}")
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_title(f"(a) gradient cosine on the shared layers ({cm} runs)", fontsize="small")
    axes[0].set_ylabel("cosine(main, aux)")
    for ax, kind, letter in ((axes[1], "near", "b"), (axes[2], "far", "c")):
        for m in methods:
            if (kind, m, seeds[0]) in acc:
                band(
                    ax,
                    {k: (s, 100 * v) for k, (s, v) in acc.items()},
                    lambda s, m=m, kind=kind: (kind, m, s),
                    linestyle=STYLES.get(m, "-."),
                    label=LABELS.get(m, m),
                )
        ax.set_title(f"({letter}) {kind} pair: {names.get(kind, '')}", fontsize="small")
        ax.set_ylabel("main-task test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"mean ± std over {len(seeds)} seed(s)", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(
        path,
        ({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()} for r in rows),
    )


def write_outputs(result: Any, out_dir: str | Path, config: dict[str, Any], choice: Any, start_time: float) -> str:
    """Write every output file under ``out_dir``; return the summary's markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "curves.csv", result.rows)
    _write_csv(out / "cosine_steps.csv", result.step_rows)
    draw_figure3(result.rows, out / "figure3.png", result.pairs)
    stats = summarize(result.rows, result.step_rows, int(config["steps"]))
    text = _markdown(stats, result, config, choice, time.perf_counter() - start_time)
    (out / "summary.md").write_text(text)
    return text
