"""The paper's gridworld distillation experiment (Du et al., section 4.3, appendix D.2, Figure 4).

A teacher learns each gridworld's *original* task by tabular Q-learning. A student learns a main
task from its 9x9 view by per-episode REINFORCE, with the teacher's action distribution as an
auxiliary distillation target:

* ``transfer="cross"`` (Figure 4, top row): the main task is the *transformed* task, the same
  layout with the teacher's reward cells removed (they no longer reward or end the episode);
* ``transfer="same"`` (bottom row): the main task is the original task itself, so the teacher
  is the solution of the same task.

Five methods (:data:`~lightning_gradsim.rl.training.METHODS`): ``reward``, ``distill``, ``add``,
``cos-weighted`` (Algorithm 2) and ``cos-unweighted`` (Algorithm 1); the figure caption's ``cos``
and ``strict cos`` are accepted as aliases. Every (transfer, method, temperature, gridworld) is
one row of one batched simulation, so all methods see the same layouts and teachers. Returns are
*exact* expected returns from the start cell (policy evaluation on the known model).

Example::

    result = run_experiment(ExperimentConfig(envs=50, steps=2_000, transfers=("cross", "same")))
    write_outputs(result, "runs/gridworld")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .expected import expected_cosine
from .student import cell_kernel
from .teacher import q_learning, teacher_policy
from .training import GATED_RULES, METHODS, StudentTrainer
from .world import GEM, GOAL, GridSpec, Layouts, policy_evaluation, sample_layouts, with_rewards

__all__ = [
    "METHODS",
    "METHOD_ALIASES",
    "TRANSFERS",
    "GATED_RULES",
    "ExperimentConfig",
    "ExperimentResult",
    "run_experiment",
    "main_task",
]

#: Other names accepted for the methods: the figure caption's ``cos`` / ``strict cos`` (and this
#: library's earlier ``strict_cos``).
METHOD_ALIASES: dict[str, str] = {"cos": "cos-weighted", "strict_cos": "cos-unweighted", "strict-cos": "cos-unweighted"}
TRANSFERS: tuple[str, ...] = ("cross", "same")
#: ``remove`` setting -> cell codes the cross task removes.
REMOVED_CODES: dict[str, tuple[int, ...]] = {"goal": (GOAL,), "all": (GOAL, GEM)}


def canonical_method(name: str) -> str:
    """The paper's name of a method (aliases resolved).

    >>> canonical_method("strict_cos"), canonical_method("add")
    ('cos-unweighted', 'add')
    """
    name = METHOD_ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(
            f"Unknown method {name!r}; choose from {', '.join(METHODS)} (aliases: {', '.join(METHOD_ALIASES)})."
        )
    return name


@dataclass
class ExperimentConfig:
    """Settings of :func:`run_experiment` (the defaults are ``gradsim gridworld``'s).

    Args:
        envs: number of gridworlds.
        steps: training steps (states visited) per student.
        seed: seeds the layouts, the teacher's exploration and the students' episodes.
        temperatures: teacher temperatures (one figure column each); 0 is greedy.
        methods: a subset of :data:`METHODS` (aliases allowed).
        transfers: ``"cross"`` (the transformed task) and/or ``"same"`` (the original task).
        remove: which positive rewards the cross task removes: ``"goal"`` (the teacher's kind; the
            GEM cells still reward) or ``"all"`` (both kinds: no positive reward is left).
        eval_every: steps between evaluation points (step 0 is evaluated too).
        lr: the students' fixed learning rate (policy and value).
        aux_weight: lambda on the distillation update (``add`` and the gated methods).
        gamma: discount of the students' returns and of the teacher's Q-learning.
        teacher_steps: Q-learning transitions per gridworld.
        spec: the gridworld distribution.
        rewards: a name of :data:`~lightning_gradsim.rl.world.REWARD_SCALES` (``"paper3"``: GOAL 10,
            GEM 5, PIT -10, MUD -1; ``"legacy"``: 1, 0.5, -1, -0.1) that replaces ``spec``'s rewards,
            or ``None`` to keep them. ``gradsim gridworld`` uses ``"paper3"`` by default.
    """

    envs: int = 200
    steps: int = 10_000
    seed: int = 0
    temperatures: tuple[float, ...] = (0.0, 0.1, 1.0)
    methods: tuple[str, ...] = METHODS
    transfers: tuple[str, ...] = ("cross",)
    remove: str = "goal"
    eval_every: int = 500
    lr: float = 0.01
    aux_weight: float = 1.0
    gamma: float = 0.99
    teacher_steps: int = 20_000
    spec: GridSpec = field(default_factory=GridSpec)
    rewards: str | None = None

    def __post_init__(self) -> None:
        if self.rewards is not None:
            self.spec = with_rewards(self.spec, self.rewards)
        if not self.methods:
            raise ValueError("Give at least one method.")
        self.methods = tuple(dict.fromkeys(canonical_method(m) for m in self.methods))
        self.transfers = tuple(dict.fromkeys(self.transfers))
        bad = [t for t in self.transfers if t not in TRANSFERS]
        if bad or not self.transfers:
            raise ValueError(f"transfers must be a non-empty subset of {TRANSFERS}, got {self.transfers}.")
        if self.remove not in REMOVED_CODES:
            raise ValueError(f"remove must be one of {tuple(REMOVED_CODES)}, got {self.remove!r}.")
        if self.envs < 1 or self.steps < 1 or self.eval_every < 1 or self.teacher_steps < 1:
            raise ValueError("envs, steps, eval_every and teacher_steps must all be >= 1.")
        if not self.temperatures or any(t < 0 or not math.isfinite(t) for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of numbers >= 0, got {self.temperatures}.")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}.")
        self.temperatures = tuple(float(t) for t in self.temperatures)

    def as_dict(self) -> dict:
        """The config as plain data (for logs)."""
        d = asdict(self)
        d["spec"] = {k: v for k, v in d["spec"].items() if k != "rewards"}
        return d


def main_task(layouts: Layouts, transfer: str, remove: str = "goal") -> Layouts:
    """The student's task: the transformed layouts for ``"cross"``, the original ones for ``"same"``."""
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}.")
    return layouts.transformed(REMOVED_CODES[remove]) if transfer == "cross" else layouts


Key = tuple[str, str, float]  # (transfer, method, temperature)


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` measured.

    Attributes:
        steps: the evaluation steps.
        returns: ``(transfer, method, temperature) -> (len(steps), envs)`` exact expected return of
            every student from the start cell of its task (``reward`` does not use the teacher: its
            one set of students appears under every temperature).
        gate: rows ``(transfer, method, temperature, step, open_fraction, mean_cosine, expected_cosine,
            expected_positive)`` of the gated methods: the fraction of the episodes that ended since the
            previous evaluation point on which the gate was open and their mean (single-episode)
            cosine; and, at the evaluation point, the cosine of the *expected* updates
            (:func:`~lightning_gradsim.rl.expected.expected_cosine`) averaged over gridworlds, and the
            fraction of gridworlds where it is positive.
        teacher_return: ``(transfer, temperature) -> (envs,)`` the teacher's return on the main task.
        teacher_original_return: ``temperature -> (envs,)`` the same on the teacher's own task.
        random_return: ``transfer -> (envs,)`` the uniformly random policy on the main task.
        layouts: the gridworlds (original task); tasks: ``transfer -> `` the students' task.
        q: the teachers' Q-values ``(envs, S, 4)``, learnt on ``layouts`` (the original task).
        example_policies: ``(transfer, method) -> (S, 4)`` final policy in gridworld 0 (first temperature).
    """

    config: ExperimentConfig
    steps: list[int]
    returns: dict[Key, Tensor]
    gate: list[tuple[str, str, float, int, float, float, float, float]]
    teacher_return: dict[tuple[str, float], Tensor]
    teacher_original_return: dict[float, Tensor]
    random_return: dict[str, Tensor]
    layouts: Layouts
    tasks: dict[str, Layouts]
    q: Tensor
    example_policies: dict[tuple[str, str], Tensor]

    @property
    def curves(self) -> list[tuple[str, str, float, int, float, float]]:
        """Rows ``(transfer, method, temperature, step, mean_return, stderr)`` (stderr across gridworlds)."""
        rows = []
        for (tr, m, t), ret in self.returns.items():
            for i, s in enumerate(self.steps):
                rows.append((tr, m, t, s, *mean_stderr(ret[i])))
        return rows

    def final_returns(self) -> dict[Key, float]:
        """``(transfer, method, temperature) -> mean return`` at the last evaluation point."""
        return {k: float(r[-1].mean()) for k, r in self.returns.items()}

    def steps_to_reach(self, baseline: str = "reward") -> dict[Key, int | None]:
        """First evaluation step at which each method's mean return reaches ``baseline``'s final one
        (same transfer and temperature); ``None`` if never."""
        out: dict[Key, int | None] = {}
        for (tr, m, t), ret in self.returns.items():
            base = self.returns.get((tr, baseline, t))
            if base is None:
                continue
            target = float(base[-1].mean())
            means = ret.mean(1)
            out[(tr, m, t)] = next((s for s, v in zip(self.steps, means.tolist()) if v >= target), None)
        return out


def mean_stderr(x: Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-d sample.

    >>> mean_stderr(torch.tensor([1.0, 2.0, 3.0]))
    (2.0, 0.5773502691896258)
    """
    x = x.double()
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


def start_returns(layouts: Layouts, probs: Tensor, chunk: int = 256) -> Tensor:
    """Exact (undiscounted) start-cell returns ``(N,)`` of policies ``(N, S, 4)``, in chunks of gridworlds."""
    out = []
    for lo in range(0, len(layouts), chunk):
        part = layouts.index(slice(lo, lo + chunk))
        v = policy_evaluation(part, probs[lo : lo + chunk])
        out.append(v.gather(1, part.start[:, None]).squeeze(1))
    return torch.cat(out)


def run_experiment(
    config: ExperimentConfig | None = None, progress: Callable[[int], None] | None = None
) -> ExperimentResult:
    """Train every (transfer, method, temperature)'s students and evaluate them; ``progress(1)``
    is called after every step."""
    cfg = config or ExperimentConfig()
    spec = cfg.spec
    n, temps = cfg.envs, cfg.temperatures
    layouts = sample_layouts(n, spec, seed=cfg.seed)
    # The teacher: Q-learning on the ORIGINAL task, whatever the transfer.
    q = q_learning(
        layouts, steps=cfg.teacher_steps, gamma=cfg.gamma, generator=torch.Generator().manual_seed(cfg.seed * 7919 + 1)
    )
    teachers = {t: teacher_policy(q, t) for t in temps}  # (N, S, 4) each
    tasks = {tr: main_task(layouts, tr, cfg.remove) for tr in cfg.transfers}
    uniform = torch.full((n, spec.num_cells, 4), 0.25)
    random_ret = {tr: start_returns(task, uniform) for tr, task in tasks.items()}
    teacher_ret = {(tr, t): start_returns(task, teachers[t]) for tr, task in tasks.items() for t in temps}
    teacher_orig = {t: start_returns(layouts, teachers[t]) for t in temps}

    # Blocks of n rows, one per (transfer, method, temperature); "reward" needs one block per transfer.
    groups: list[tuple[str, str, float | None]] = []
    for tr in cfg.transfers:
        for m in cfg.methods:
            groups += [(tr, m, None)] if m == "reward" else [(tr, m, t) for t in temps]
    kernel = torch.cat([cell_kernel(tasks[tr]) for tr in cfg.transfers])  # (len(transfers) * n, S, S)
    task_rows = Layouts(
        torch.cat([tasks[tr].cells for tr, _, _ in groups]), torch.cat([tasks[tr].start for tr, _, _ in groups]), spec
    )
    row_kernel = torch.cat([cfg.transfers.index(tr) * n + torch.arange(n) for tr, _, _ in groups])
    teacher_rows = torch.cat([teachers[t] if t is not None else uniform for _, _, t in groups])
    trainer = StudentTrainer(
        task_rows,
        kernel,
        row_kernel,
        teacher_rows,
        [m for _, m, _ in groups],
        block=n,
        lr=cfg.lr,
        aux_weight=cfg.aux_weight,
        gamma=cfg.gamma,
        seed=cfg.seed,
    )
    gate_sums = torch.zeros(3, len(trainer))  # per row: finished gated episodes, opens, sum of cosines
    eval_steps: list[int] = []
    returns: dict[tuple[str, str, float | None], list[Tensor]] = {g: [] for g in groups}
    gate_rows: list[tuple[str, str, float, int, float, float, float, float]] = []

    def evaluate(step: int) -> None:
        if not bool(torch.isfinite(trainer.student.policy).all() & torch.isfinite(trainer.student.value_coef).all()):
            raise RuntimeError(
                f"The students' weights became non-finite by step {step} (lr={cfg.lr} is too large for "
                "these settings); lower --lr."
            )
        eval_steps.append(step)
        for gi, (tr, m, t) in enumerate(groups):
            rows = slice(gi * n, (gi + 1) * n)
            probs = trainer.policies(rows)
            returns[(tr, m, t)].append(start_returns(tasks[tr], probs))
            if m in GATED_RULES and t is not None and step > 0:  # t is None only for the reward baseline
                episodes, opens, cos_sum = gate_sums[:, rows].sum(1).tolist()
                k = cfg.transfers.index(tr) * n
                exact = expected_cosine(tasks[tr], kernel[k : k + n], probs, teachers[t], cfg.gamma)
                gate_rows.append(
                    (
                        tr,
                        m,
                        float(t),
                        step,
                        opens / max(episodes, 1.0),
                        cos_sum / episodes if episodes else float("nan"),
                        float(exact.mean()),
                        float((exact > 0).double().mean()),
                    )
                )
        gate_sums.zero_()

    evaluate(0)
    for step in range(1, cfg.steps + 1):
        out = trainer.step()
        if out.gated.numel():
            gate_sums[0].index_add_(0, out.gated, torch.ones(out.gated.numel()))
            gate_sums[1].index_add_(0, out.gated, out.gate_open.float())
            gate_sums[2].index_add_(0, out.gated, out.cosine.float())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
        if progress is not None:
            progress(1)

    stacked: dict[Key, Tensor] = {}
    example: dict[tuple[str, str], Tensor] = {}
    for gi, (tr, m, t) in enumerate(groups):
        ret = torch.stack(returns[(tr, m, t)])
        for tt in temps if t is None else [t]:
            stacked[(tr, m, tt)] = ret
        if t is None or t == temps[0]:
            example[(tr, m)] = trainer.policies(slice(gi * n, gi * n + 1))[0]
    return ExperimentResult(
        cfg, eval_steps, stacked, gate_rows, teacher_ret, teacher_orig, random_ret, layouts, tasks, q, example
    )
