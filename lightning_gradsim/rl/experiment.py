"""The paper's cross-environment distillation experiment (Du et al., section 4.3 / appendix D.2).

A teacher learns each gridworld's *original* task by tabular Q-learning; a student learns the
*transformed* task (the teacher's GOAL cells no longer reward) from its 9x9 view, by REINFORCE,
with the teacher's action distribution as an auxiliary distillation target. Five methods:

* ``reward``: policy gradient only;   * ``distill``: distillation only;   * ``add``: both summed;
* ``cos``: ``GradientGate(rule="weighted")``;   * ``strict_cos``: ``GradientGate(rule="unweighted")``,

the gated ones combining the two update vectors of every gridworld with
``gate.combine(policy_grad, {"distill": distill_grad}, batch_dims=1)`` (one gate state per
gridworld). Every (method, temperature, gridworld) triple is one row of one batched simulation, so
all methods see the same layouts. Returns are *exact* expected returns from the start cell
(policy evaluation on the known model), averaged over gridworlds, with standard errors.

Example::

    result = run_experiment(ExperimentConfig(envs=50, steps=2_000))
    write_outputs(result, "runs/gridworld")
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..gate import GradientGate
from .batched import BatchedGridworld
from .student import EpisodeAccumulator, LinearStudent, cell_kernel, kernel_factor
from .teacher import q_learning, teacher_policy
from .world import GridSpec, Layouts, policy_evaluation, sample_layouts

__all__ = ["METHODS", "ExperimentConfig", "ExperimentResult", "run_experiment", "write_outputs", "greedy_path"]

METHODS: tuple[str, ...] = ("reward", "distill", "add", "cos", "strict_cos")
#: gated method -> rule of :class:`~lightning_gradsim.GradientGate`.
GATED_RULES: dict[str, str] = {"cos": "weighted", "strict_cos": "unweighted"}


@dataclass
class ExperimentConfig:
    """Settings of :func:`run_experiment` (the defaults are ``gradsim gridworld``'s).

    Args:
        envs: number of gridworlds.
        steps: training steps (states visited) per student.
        seed: seeds the layouts, the teacher's exploration and the students' episodes.
        temperatures: teacher temperatures (one figure panel each); 0 is greedy.
        methods: a subset of :data:`METHODS`.
        eval_every: steps between evaluation points (step 0 is evaluated too).
        lr: the students' fixed learning rate (policy and value).
        aux_weight: lambda on the distillation update (``add``, ``cos``, ``strict_cos``).
        teacher_steps: Q-learning transitions per gridworld.
        spec: the gridworld distribution.
    """

    envs: int = 200
    steps: int = 10_000
    seed: int = 0
    temperatures: tuple[float, ...] = (0.0, 0.1, 1.0)
    methods: tuple[str, ...] = METHODS
    eval_every: int = 500
    lr: float = 0.01
    aux_weight: float = 1.0
    teacher_steps: int = 20_000
    spec: GridSpec = field(default_factory=GridSpec)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
        if not self.methods:
            raise ValueError("Give at least one method.")
        if self.envs < 1 or self.steps < 1 or self.eval_every < 1 or self.teacher_steps < 1:
            raise ValueError("envs, steps, eval_every and teacher_steps must all be >= 1.")
        if not self.temperatures or any(t < 0 or not math.isfinite(t) for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of numbers >= 0, got {self.temperatures}.")
        self.temperatures = tuple(float(t) for t in self.temperatures)
        self.methods = tuple(self.methods)


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` measured.

    Attributes:
        curves: rows ``(method, temperature, step, mean_return, stderr)``.
        gate: rows ``(method, temperature, step, open_fraction, mean_cosine)`` over the episodes
            that ended since the previous evaluation point (gated methods only).
        teacher_return: ``temperature -> (mean, stderr)`` of the teacher's policy on the main task.
        teacher_original_return: the same on the teacher's own (original) task.
        random_return: ``(mean, stderr)`` of the uniformly random policy on the main task.
        layouts: the gridworlds (original task).
        q: the teachers' Q-values ``(N, S, 4)``.
        example_policies: ``method -> (S, 4)`` final student policy of gridworld 0 (first temperature).
    """

    config: ExperimentConfig
    curves: list[tuple[str, float, int, float, float]]
    gate: list[tuple[str, float, int, float, float]]
    teacher_return: dict[float, tuple[float, float]]
    teacher_original_return: dict[float, tuple[float, float]]
    random_return: tuple[float, float]
    layouts: Layouts
    q: Tensor
    example_policies: dict[str, Tensor]

    def final_returns(self) -> dict[tuple[str, float], float]:
        """``(method, temperature) -> mean return`` at the last evaluation point."""
        last = max(r[2] for r in self.curves)
        return {(m, t): v for m, t, s, v, _ in self.curves if s == last}

    def steps_to_reach(self, baseline: str = "reward") -> dict[tuple[str, float], int | None]:
        """First evaluation step at which each method's mean return reaches ``baseline``'s final one."""
        final = self.final_returns()
        out: dict[tuple[str, float], int | None] = {}
        for method in self.config.methods:
            for t in self.config.temperatures:
                target = final.get((baseline, t))
                rows = sorted((s, v) for m, tt, s, v, _ in self.curves if m == method and tt == t)
                out[(method, t)] = None if target is None else next((s for s, v in rows if v >= target), None)
        return out


def _mean_stderr(x: Tensor) -> tuple[float, float]:
    x = x.double()
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


def _start_value(layouts: Layouts, probs: Tensor) -> Tensor:
    v = policy_evaluation(layouts, probs)
    return v.gather(1, layouts.start[:, None]).squeeze(1)


def _start_returns(layouts: Layouts, probs: Tensor, chunk: int = 256) -> Tensor:
    """Exact start-cell returns ``(N,)`` of policies ``(N, S, 4)``, in chunks of gridworlds."""
    return torch.cat(
        [
            _start_value(layouts.index(slice(lo, lo + chunk)), probs[lo : lo + chunk])
            for lo in range(0, len(layouts), chunk)
        ]
    )


def run_experiment(
    config: ExperimentConfig | None = None, progress: Callable[[int], None] | None = None
) -> ExperimentResult:
    """Train every method's students and evaluate them; ``progress(k)`` is called after every k steps.

    ``reward`` does not use the teacher, so it is trained once and its curve is shown for every
    temperature.
    """
    cfg = config or ExperimentConfig()
    spec = cfg.spec
    n, temps, methods = cfg.envs, cfg.temperatures, cfg.methods
    layouts = sample_layouts(n, spec, seed=cfg.seed)
    main_task = layouts.transformed()
    q = q_learning(layouts, steps=cfg.teacher_steps, generator=torch.Generator().manual_seed(cfg.seed * 7919 + 1))
    teachers = torch.stack([teacher_policy(q, t) for t in temps])  # (T, N, S, 4)

    random_ret = _mean_stderr(_start_returns(main_task, torch.full((n, spec.num_cells, 4), 0.25)))
    teacher_ret = {t: _mean_stderr(_start_returns(main_task, teachers[i])) for i, t in enumerate(temps)}
    teacher_orig = {t: _mean_stderr(_start_returns(layouts, teachers[i])) for i, t in enumerate(temps)}

    # Blocks of n rows, one per (method, temperature); gridworld fastest. "reward" needs one block.
    groups: list[tuple[str, float | None]] = []
    for m in methods:
        groups += [(m, None)] if m == "reward" else [(m, t) for t in temps]
    batch = len(groups) * n
    kernel = cell_kernel(main_task)
    factor = kernel_factor(kernel)
    row_layout = torch.arange(batch) % n
    student = LinearStudent(kernel, row_layout)
    acc = EpisodeAccumulator(student)
    sim = BatchedGridworld(main_task.repeat(len(groups)), generator=torch.Generator().manual_seed(cfg.seed * 7919 + 2))
    temp_index = {t: i for i, t in enumerate(temps)}
    teacher_rows = torch.cat(
        [teachers[temp_index[t]] if t is not None else torch.full_like(teachers[0], 0.25) for _, t in groups]
    )  # (B, S, 4)
    group_of_row = torch.arange(batch) // n
    method_blocks = {m: [gi for gi, (mm, _) in enumerate(groups) if mm == m] for m in methods}
    gates = {m: GradientGate(rule=GATED_RULES[m], aux_weight=cfg.aux_weight) for m in methods if m in GATED_RULES}
    gate_sums = {m: torch.zeros(3, len(method_blocks[m]) * n) for m in gates}  # episodes, opens, cosines
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 3)
    row_idx = torch.arange(batch)
    s_a = spec.num_cells * 4

    curves: list[tuple[str, float, int, float, float]] = []
    gate_rows: list[tuple[str, float, int, float, float]] = []

    def evaluate(step: int) -> None:
        if not bool(torch.isfinite(student.policy).all() & torch.isfinite(student.value_coef).all()):
            raise RuntimeError(
                f"The students' weights became non-finite by step {step} (lr={cfg.lr} is too large for "
                "these settings); lower --lr."
            )
        for gi, (m, t) in enumerate(groups):
            rows = slice(gi * n, (gi + 1) * n)
            mean, se = _mean_stderr(_start_returns(main_task, torch.softmax(student.all_logits(rows), -1)))
            for tt in temps if t is None else [t]:
                curves.append((m, tt, step, mean, se))
        for m, sums in gate_sums.items():
            for ti, t in enumerate(temps):
                part = sums[:, ti * n : (ti + 1) * n].sum(1)
                episodes = float(part[0])
                if step > 0:
                    gate_rows.append(
                        (
                            m,
                            t,
                            step,
                            float(part[1]) / max(episodes, 1.0),
                            float(part[2]) / episodes if episodes else float("nan"),
                        )
                    )
            sums.zero_()

    evaluate(0)
    sim.reset(observe=False)
    for step in range(1, cfg.steps + 1):
        pos = sim.position
        probs, actions = student.act(pos, gen)
        acc.record(pos, probs, actions, student.value(pos), teacher_rows[row_idx, pos])
        _, reward, done = sim.step(actions, observe=False)
        acc.reward(reward)
        if bool(done.any()):
            rows, pg, vg, dg = acc.take(done)
            group = group_of_row[rows]
            update = torch.zeros_like(pg)
            for m in methods:
                blocks = method_blocks[m]
                sel = ((group >= blocks[0]) & (group <= blocks[-1])).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                if m == "reward":
                    update[sel] = pg[sel]
                elif m == "distill":
                    update[sel] = dg[sel]
                elif m == "add":
                    update[sel] = pg[sel] + cfg.aux_weight * dg[sel]
                else:
                    # One gate row per (temperature, gridworld). The gate sees each update through
                    # L^T C, which has the parameter-space dot products (see student.py); rows whose
                    # episode goes on get zero vectors and their updates are dropped.
                    local = rows[sel] - blocks[0] * n
                    lt = factor[row_layout[rows[sel]]].transpose(1, 2)
                    z_pg = torch.zeros(len(blocks) * n, s_a).index_copy_(0, local, torch.bmm(lt, pg[sel]).flatten(1))
                    z_dg = torch.zeros(len(blocks) * n, s_a).index_copy_(0, local, torch.bmm(lt, dg[sel]).flatten(1))
                    _, stats = gates[m].combine(z_pg, {"distill": z_dg}, batch_dims=1)
                    weight = stats.weight[local, 0]  # the rules keep the main update with coefficient 1
                    update[sel] = pg[sel] + weight.view(-1, 1, 1) * dg[sel]
                    gate_sums[m][0].index_add_(0, local, torch.ones(local.numel()))
                    gate_sums[m][1].index_add_(0, local, stats.gate_open[local, 0].float())
                    gate_sums[m][2].index_add_(0, local, stats.cosine[local, 0].float())
            student.policy.index_add_(0, rows, cfg.lr * update)
            student.value_coef.index_add_(0, rows, cfg.lr * vg)
            sim.reset(mask=done, observe=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
        if progress is not None:
            progress(1)

    example: dict[str, Tensor] = {}
    for gi, (m, t) in enumerate(groups):
        if t is None or t == temps[0]:
            example[m] = torch.softmax(student.all_logits(slice(gi * n, gi * n + 1))[0], -1)
    return ExperimentResult(cfg, curves, gate_rows, teacher_ret, teacher_orig, random_ret, layouts, q, example)


def greedy_path(layouts: Layouts, index: int, policy: Tensor, max_len: int = 60) -> list[int]:
    """Cells visited by the noise-free greedy rollout of ``policy`` ``(S, 4)`` in gridworld ``index``."""
    nxt = layouts.next_cell()[index]
    codes = layouts.flat_cells()[index]
    terminal = GridSpec.terminal_table()
    pos = int(layouts.start[index])
    path = [pos]
    for _ in range(max_len):
        if bool(terminal[codes[pos]]):
            break
        pos = int(nxt[pos, int(policy[pos].argmax())])
        seen = pos in path
        path.append(pos)
        if seen:  # a deterministic loop (or bumping into a wall)
            break
    return path


# ---------------------------------------------------------------------------------------- outputs
def write_outputs(result: ExperimentResult, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``curves.csv``, ``gate.csv``, ``summary.csv``, ``curves.png`` and ``layout.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("curves.csv", "gate.csv", "summary.csv", "curves.png", "layout.png")}
    with open(paths["curves.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "temperature", "step", "mean_return", "stderr"])
        for m, t, s, v, se in result.curves:
            w.writerow([m, t, s, f"{v:.6f}", f"{se:.6f}"])
        for t, (v, se) in result.teacher_return.items():
            w.writerow(["teacher", t, result.config.steps, f"{v:.6f}", f"{se:.6f}"])
        for t in result.config.temperatures:
            w.writerow(
                ["random", t, result.config.steps, f"{result.random_return[0]:.6f}", f"{result.random_return[1]:.6f}"]
            )
    with open(paths["gate.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "temperature", "step", "open_fraction", "mean_cosine"])
        for row in result.gate:
            w.writerow([row[0], row[1], row[2], f"{row[3]:.6f}", f"{row[4]:.6f}"])
    final = result.final_returns()
    reach = result.steps_to_reach("reward")
    with open(paths["summary.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "temperature", "final_mean_return", "steps_to_reach_reward_final"])
        for (m, t), v in final.items():
            s = reach.get((m, t))
            w.writerow([m, t, f"{v:.6f}", "" if s is None else s])
    _plot_curves(result, paths["curves.png"])
    _plot_layout(result, paths["layout.png"])
    return paths


def _plot_curves(result: ExperimentResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    temps = result.config.temperatures
    fig, axes = plt.subplots(1, len(temps), figsize=(4.2 * len(temps), 3.4), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], temps):
        for m in result.config.methods:
            rows = sorted((s, v, se) for mm, tt, s, v, se in result.curves if mm == m and tt == t)
            s, v, se = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
            (line,) = ax.plot(s, v, label=m)
            ax.fill_between(s, v - se, v + se, color=line.get_color(), alpha=0.2)
        ax.axhline(result.teacher_return[t][0], color="k", linestyle=":", label="teacher")
        ax.axhline(result.random_return[0], color="grey", linestyle=":", label="random")
        ax.set_title(f"teacher temperature {t:g}")
        ax.set_xlabel("training steps")
    axes[0][0].set_ylabel(f"expected return ({result.config.envs} gridworlds)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_layout(result: ExperimentResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from .world import CODE_COLOURS

    colours = np.array(CODE_COLOURS, dtype=np.uint8)

    spec = result.config.spec
    original = result.layouts.index(0)
    transformed = original.transformed()
    teacher = teacher_policy(result.q[0], 0.0)
    method = "cos" if "cos" in result.example_policies else next(iter(result.example_policies))
    panels = [
        ("initial task", original, None),
        ("teacher's solution", original, teacher),
        ("transformed task", transformed, None),
        (f"student's solution ({method})", transformed, result.example_policies[method]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, lay, pol) in zip(axes, panels):
        grid = lay.cells[0].numpy()
        ax.imshow(colours[grid])
        r0, c0 = divmod(int(lay.start[0]), spec.width)
        ax.plot(c0, r0, "o", color="gold", markersize=10, markeredgecolor="k")
        if pol is not None:
            cells = greedy_path(lay, 0, pol)
            rc = np.array([divmod(c, spec.width) for c in cells])
            ax.plot(rc[:, 1], rc[:, 0], "-", color="gold", linewidth=2.5)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.text(
        0.5,
        0.01,
        "green: goal (teacher's reward, gone in the transformed task), blue: gem, red: pit, brown: mud",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_dict(cfg: ExperimentConfig) -> dict:
    """The config as plain data (for logs)."""
    d = asdict(cfg)
    d["spec"] = {k: v for k, v in d["spec"].items() if k != "rewards"}
    return d
