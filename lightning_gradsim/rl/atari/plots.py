"""Figures in the style of the paper's Figures 5 (Breakout) and 6 (two games) from curve rows.

``curves.png``: one game: returns per method (mean over seeds, shaded min-max) with the
teacher's and the random policy's returns, and the gated method's cosine and KL weight. Two or
more games: returns per game, the gated method's cosine with each game's RL gradient, and the
average normalised score (each game divided by the best seed-mean score of any method).

Example::

    plot_curves(result.curves, games=("breakout",), methods=METHODS, path="curves.png",
                teacher_return=3.1, random_return={"breakout": 0.5}, threshold=0.02)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["LABELS", "nanmean", "seed_curves", "plot_curves"]

#: method -> the paper's label (single game, multi-task).
LABELS: dict[str, tuple[str, str]] = {
    "rl": ("RL (baseline)", "Multitask"),
    "kl": ("Only KL", "Only KL"),
    "rl_kl": ("RL+KL (baseline)", "Multitask RL + Distillation"),
    "rl_kl_cos": ("RL+KL (gated, ours)", "Multitask RL + Distillation (gated, ours)"),
}
COLOURS = {"rl": "tab:blue", "kl": "tab:green", "rl_kl": "tab:orange", "rl_kl_cos": "tab:red"}


def nanmean(x, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` that returns NaN for all-NaN slices without a warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(x, dtype=float), axis=axis)


def seed_curves(curves: Sequence[tuple], method: str, game: str, column: int) -> tuple[np.ndarray, np.ndarray]:
    """``(frames [F], values [S, F])`` of one column of the curve rows, one row per seed."""
    rows = [r for r in curves if r[0] == method and r[3] == game]
    frames = np.array(sorted({r[2] for r in rows}), dtype=float)
    seeds = sorted({r[1] for r in rows})
    values = np.full((len(seeds), len(frames)), np.nan)
    f_index = {f: i for i, f in enumerate(frames)}
    s_index = {s: i for i, s in enumerate(seeds)}
    for r in rows:
        values[s_index[r[1]], f_index[r[2]]] = r[column]
    return frames, values


def _band(ax, frames: np.ndarray, values: np.ndarray, colour: str, label: str, linestyle: str = "-") -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
    ax.plot(frames, mean, color=colour, label=label, linestyle=linestyle)
    if values.shape[0] > 1:
        ax.fill_between(frames, lo, hi, color=colour, alpha=0.15, linewidth=0)


def plot_curves(
    curves: Sequence[tuple],
    games: Sequence[str],
    methods: Sequence[str],
    path: str | os.PathLike,
    teacher_return: float | None = None,
    random_return: dict[str, float] | None = None,
    threshold: float | None = None,
    title: str = "",
) -> None:
    """Write the Figure-5 (one game) or Figure-6 (several games) style PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    multi = len(games) > 1
    panels = len(games) + 2 if multi else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.6), squeeze=False)
    axes = axes[0]
    label_i = 1 if multi else 0
    for ax, game in zip(axes, games):
        for meth in methods:
            f, v = seed_curves(curves, meth, game, 4)
            _band(ax, f, v, COLOURS.get(meth, "k"), LABELS.get(meth, (meth, meth))[label_i])
        if teacher_return is not None and game == games[0] and np.isfinite(teacher_return):
            ax.axhline(teacher_return, color="k", linestyle=":", label="teacher")
        if random_return and game in random_return:
            ax.axhline(random_return[game], color="grey", linestyle=":", label="random")
        ax.set_title(game)
        ax.set_xlabel("frames")
        ax.set_ylabel("mean episode return")
    axes[0].legend(fontsize=7, loc="upper left")
    gated = "rl_kl_cos" if "rl_kl_cos" in methods else None
    ax = axes[len(games)] if multi else axes[1]
    if gated is not None:
        if multi:
            for game, style in zip(games, ("-", "--", ":", "-.")):
                f, v = seed_curves(curves, gated, game, 5)
                _band(ax, f, v, "tab:purple", f"cos(KL, RL {game})", style)
        else:
            f, v = seed_curves(curves, gated, games[0], 5)
            _band(ax, f, v, "tab:purple", "cos(KL, RL)")
        f, w = seed_curves(curves, gated, games[0], 6)
        _band(ax, f, w, "tab:red", "weight on KL")
        if threshold is not None:
            ax.axhline(threshold, color="k", linestyle=":", linewidth=0.8, label=f"threshold {threshold:g}")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.legend(fontsize=7)
    ax.set_title("gated run: cosine, KL weight")
    ax.set_xlabel("frames")
    if multi:
        ax = axes[-1]
        best = {}
        for game in games:
            means = [nanmean(seed_curves(curves, meth, game, 4)[1], 0) for meth in methods]
            best[game] = max([float(np.nanmax(m)) for m in means if np.isfinite(m).any()] or [1.0])
        for meth in methods:
            parts = []
            for game in games:
                f, v = seed_curves(curves, meth, game, 4)
                parts.append(v / best[game] if best[game] > 0 else v)
            _band(ax, f, np.mean(parts, 0), COLOURS.get(meth, "k"), LABELS.get(meth, (meth, meth))[1])
        ax.set_title("average normalised score")
        ax.set_xlabel("frames")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
