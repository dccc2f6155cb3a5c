"""Synthetic task relatedness: the projection blog's third experiment (after GradNorm's setup).

Each task is the regression ``y = sigma * tanh(B x)`` with 250-d inputs ``x ~ N(0, I)`` and
100-d outputs, ``B`` a 100 x 250 matrix with i.i.d. ``N(0, 10)`` entries (10 is the variance). The
auxiliary task's matrix is the main one (``"same"``), the main one plus i.i.d. ``N(0, 3.5)`` noise
(``"similar"``), or an independent draw (``"unrelated"``). Each task has its own training inputs
(1000 vectors; the tasks share no inputs); the main task has 1000 validation and 10000 test vectors.
A 4-layer ReLU trunk of width 100 feeds one linear head per task; Adam; early stopping on the
main task's validation loss (the test loss is read at the best validation epoch).

The sweep compares single-task training, ``sum``, ``projection`` (also with an EMA of the main
gradient), ``unweighted`` and ``weighted`` over several lambdas and seeds. By default it runs the
blog's third-claim comparison (:data:`CLAIM3_METHODS`: its Figure 13, alpha = 0.01) and writes the
verdict to ``claim3.md`` (:mod:`.relatedness_claims`); ``--methods all`` adds alpha = 1 and 0.1. Because the tasks are
tiny, all runs of the sweep train *together* as one batched network (a leading "run" dimension on
every weight), and each method's runs are gated by one :class:`~lightning_gradsim.GradientGate`
through ``combine(..., batch_dims=1)``, each run with its own gate state.

The blog's EMA ``M_t = alpha g_t + (1 - alpha) M_{t-1}`` weighs the *new* gradient by alpha; our
``main_grad_ema`` is the weight of the *old* value (``d_t = beta d_{t-1} + (1 - beta) g_t``), so
blog alpha = 0.1 is ``main_grad_ema=0.9`` and alpha = 1 is plain ``projection``.

Command line (writes ``runs.csv``, ``summary.csv``, ``table.md``, ``relatedness.png``, ``claim3.md``)::

    gradsim relatedness --seeds 3 --lambdas 0.3,1,3 --out relatedness_out
    gradsim relatedness --full --out relatedness_full

Python::

    from lightning_gradsim.experiments.relatedness import SweepConfig, run_sweep
    rows = run_sweep(SweepConfig(seeds=(0, 1), lambdas=(0.3, 1.0), max_epochs=5))
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gate import GradientGate
from ..methods import make_gate
from ..rules import Rule
from .ema_cosine import DirectionUnweighted, DirectionWeighted
from .relatedness_claims import claim3_markdown

__all__ = [
    "RELATEDNESS",
    "METHODS",
    "CLAIM3_METHODS",
    "BLOG_ALPHA",
    "MethodSpec",
    "TaskData",
    "SweepConfig",
    "RunResult",
    "task_matrices",
    "make_tasks",
    "RelatednessNet",
    "train_reference",
    "run_sweep",
    "summarize",
    "markdown_table",
    "plot_sweep",
    "main",
]

RELATEDNESS: tuple[str, ...] = ("same", "similar", "unrelated")


@dataclass(frozen=True)
class MethodSpec:
    """One line of the sweep: a gate rule, its main-gradient EMA, and whether lambda is swept.

    ``rule`` is a registered rule name or a :class:`~lightning_gradsim.rules.Rule` subclass (built
    once per gate); ``main_grad_ema`` is ``1 - alpha`` of the blog.
    """

    rule: str | type[Rule]
    main_grad_ema: float = 0.0
    single_task: bool = False  #: train the trunk on the main task only (lambda is ignored)
    label: str = ""

    def gate(self, aux_weight: float) -> GradientGate:
        """A fresh gate of this method with ``aux_weight`` (0 for single-task training)."""
        weight = 0.0 if self.single_task else aux_weight
        if isinstance(self.rule, str):
            return make_gate(self.rule, aux_weight=weight, main_grad_ema=self.main_grad_ema)
        return GradientGate(rule=self.rule(), aux_weight=weight, main_grad_ema=self.main_grad_ema)


#: The blog's EMA setting of its Figure 13 (alpha = 0.01): ``main_grad_ema = 1 - alpha``.
BLOG_ALPHA = 0.01

#: Sweep methods by key. ``projection`` is the blog's alpha = 1. The ``*_alpha0.01`` cosine rules
#: measure their cosine against the main-gradient EMA (:mod:`.ema_cosine`), our reading of Figure 13.
METHODS: dict[str, MethodSpec] = {
    "single": MethodSpec("sum", single_task=True, label="single task"),
    "sum": MethodSpec("sum", label="sum"),
    "projection": MethodSpec("projection", label="projection (alpha=1)"),
    "projection_alpha0.1": MethodSpec("projection", main_grad_ema=0.9, label="projection (alpha=0.1)"),
    "projection_alpha0.01": MethodSpec("projection", main_grad_ema=1 - BLOG_ALPHA, label="projection (alpha=0.01)"),
    "unweighted": MethodSpec("unweighted", label="unweighted"),
    "weighted": MethodSpec("weighted", label="weighted"),
    "unweighted_alpha0.01": MethodSpec(
        DirectionUnweighted, main_grad_ema=1 - BLOG_ALPHA, label="unweighted (alpha=0.01)"
    ),
    "weighted_alpha0.01": MethodSpec(DirectionWeighted, main_grad_ema=1 - BLOG_ALPHA, label="weighted (alpha=0.01)"),
}

#: The default comparison: the blog's third claim (Figure 13, alpha = 0.01): single task, multitask,
#: projection with the EMA, and both cosine rules (with the same EMA, and as in Du et al. without).
CLAIM3_METHODS: tuple[str, ...] = (
    "single",
    "sum",
    "projection_alpha0.01",
    "unweighted_alpha0.01",
    "weighted_alpha0.01",
    "unweighted",
    "weighted",
)


# ---------------------------------------------------------------------------------------- data
def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(stream))


def task_matrices(
    relatedness: str,
    seed: int,
    input_dim: int = 250,
    output_dim: int = 100,
    b_var: float = 10.0,
    noise_var: float = 3.5,
) -> tuple[Tensor, Tensor]:
    """The main and auxiliary ``(output_dim, input_dim)`` matrices for one seed.

    The main matrix depends on ``seed`` only, so every relatedness setting of a seed shares the
    main task (paired comparisons). Example::

        b_main, b_aux = task_matrices("similar", seed=0)   # b_aux - b_main ~ N(0, 3.5)
    """
    if relatedness not in RELATEDNESS:
        raise ValueError(f"Unknown relatedness {relatedness!r}; choose from {', '.join(RELATEDNESS)}.")
    b_main = torch.randn(output_dim, input_dim, generator=_generator(seed, 0)) * math.sqrt(b_var)
    if relatedness == "same":
        return b_main, b_main.clone()
    if relatedness == "similar":
        noise = torch.randn(output_dim, input_dim, generator=_generator(seed, 1)) * math.sqrt(noise_var)
        return b_main, b_main + noise
    return b_main, torch.randn(output_dim, input_dim, generator=_generator(seed, 2)) * math.sqrt(b_var)


@dataclass
class TaskData:
    """Inputs and targets of one seed and relatedness setting (float32 tensors ``(n, dim)``)."""

    b_main: Tensor
    b_aux: Tensor
    main_train: tuple[Tensor, Tensor]
    main_val: tuple[Tensor, Tensor]
    main_test: tuple[Tensor, Tensor]
    aux_train: tuple[Tensor, Tensor]


def _regression(b: Tensor, scale: float, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, b.shape[1], generator=gen)
    return x, scale * torch.tanh(x @ b.T)


def make_tasks(
    relatedness: str,
    seed: int,
    n_train: int = 1000,
    n_val: int = 1000,
    n_test: int = 10000,
    main_scale: float = 1.0,
    aux_scale: float = 1.0,
    input_dim: int = 250,
    output_dim: int = 100,
    b_var: float = 10.0,
    noise_var: float = 3.5,
) -> TaskData:
    """Draw the two tasks' matrices and data. Each task gets its own inputs.

    Example::

        data = make_tasks("unrelated", seed=3)
        x, y = data.main_train                    # (1000, 250), (1000, 100)
    """
    b_main, b_aux = task_matrices(relatedness, seed, input_dim, output_dim, b_var, noise_var)
    gen_main = _generator(seed, 10)
    main_train = _regression(b_main, main_scale, n_train, gen_main)
    main_val = _regression(b_main, main_scale, n_val, gen_main)
    main_test = _regression(b_main, main_scale, n_test, gen_main)
    aux_train = _regression(b_aux, aux_scale, n_train, _generator(seed, 20 + RELATEDNESS.index(relatedness)))
    return TaskData(b_main, b_aux, main_train, main_val, main_test, aux_train)


# ---------------------------------------------------------------------------------------- model
class RelatednessNet(nn.Module):
    """The plain (one-run) network: ``depth`` ReLU layers of ``width`` and one linear head per task.

    Example::

        net = RelatednessNet()
        loss = F.mse_loss(net.main_head(net.trunk(x)), y)
    """

    def __init__(self, input_dim: int = 250, output_dim: int = 100, width: int = 100, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(input_dim if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.main_head = nn.Linear(width, output_dim)
        self.aux_head = nn.Linear(width, output_dim)

    def linears(self) -> list[nn.Linear]:
        """The linear layers in order: trunk..., main head, aux head."""
        return [m for m in self.trunk if isinstance(m, nn.Linear)] + [self.main_head, self.aux_head]


def _init_net(seed: int, input_dim: int, output_dim: int, width: int, depth: int) -> RelatednessNet:
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init, without touching the global RNG
        torch.manual_seed(seed)
        return RelatednessNet(input_dim, output_dim, width, depth)


def _mse_per_run(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).mean(dim=(-1, -2))


class _BatchedNet:
    """``R`` independent copies of :class:`RelatednessNet` as tensors with a leading run dimension."""

    def __init__(self, nets: Sequence[RelatednessNet]) -> None:
        layers = [net.linears() for net in nets]
        self.weights = [
            torch.stack([ls[i].weight.detach().T for ls in layers]).contiguous() for i in range(len(layers[0]))
        ]
        self.biases = [
            torch.stack([ls[i].bias.detach() for ls in layers]).unsqueeze(1).contiguous() for i in range(len(layers[0]))
        ]
        for t in self.weights + self.biases:
            t.requires_grad_(True)
        self.depth = len(self.weights) - 2

    @classmethod
    def from_tensors(cls, params: Sequence[Tensor]) -> _BatchedNet:
        """Build from ``params()``-ordered tensors (copied into new leaves)."""
        net = cls.__new__(cls)
        n = len(params) // 2
        net.depth = n - 2
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        trunk, heads = leaves[: 2 * net.depth], leaves[2 * net.depth :]
        net.weights = trunk[0::2] + heads[0::2]
        net.biases = trunk[1::2] + heads[1::2]
        return net

    def trunk_params(self) -> list[Tensor]:
        return [t for i in range(self.depth) for t in (self.weights[i], self.biases[i])]

    def head_params(self, head: int) -> list[Tensor]:
        i = self.depth + head
        return [self.weights[i], self.biases[i]]

    def params(self) -> list[Tensor]:
        return self.trunk_params() + self.head_params(0) + self.head_params(1)

    def forward(self, x: Tensor, head: int, runs: slice | None = None) -> Tensor:
        """``x``: ``(R, n, in)`` -> ``(R, n, out)`` through the trunk and head ``head`` (0 main, 1 aux)."""
        sl = runs if runs is not None else slice(None)
        h = x
        for i in range(self.depth):
            h = torch.relu(torch.baddbmm(self.biases[i][sl], h, self.weights[i][sl]))
        i = self.depth + head
        return torch.baddbmm(self.biases[i][sl], h, self.weights[i][sl])


# ---------------------------------------------------------------------------------------- sweep
@dataclass
class SweepConfig:
    """Everything the sweep reads. Defaults are the quick sweep; :meth:`full` the complete one."""

    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = (0.3, 1.0, 3.0)
    methods: tuple[str, ...] = CLAIM3_METHODS
    relatedness: tuple[str, ...] = RELATEDNESS
    max_epochs: int = 40
    patience: int = 5
    batch_size: int = 100
    lr: float = 2e-3
    n_train: int = 1000
    n_val: int = 1000
    n_test: int = 10000
    main_scale: float = 1.0
    aux_scale: float = 1.0
    width: int = 100
    depth: int = 4
    input_dim: int = 250
    output_dim: int = 100
    progress: bool = True
    compact: bool = True  #: drop early-stopped runs from the batch (same results, less compute)

    @classmethod
    def full(cls, **overrides: object) -> SweepConfig:
        """The complete sweep: 10 seeds, 6 lambdas, smaller learning rate, longer patience."""
        base = cls(
            seeds=tuple(range(10)), lambdas=(0.03, 0.1, 0.3, 1.0, 3.0, 10.0), lr=1e-3, max_epochs=150, patience=10
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
        bad = [r for r in self.relatedness if r not in RELATEDNESS]
        if bad:
            raise ValueError(f"Unknown relatedness {bad}; choose from {', '.join(RELATEDNESS)}.")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed, e.g. --seeds 3.")
        if any(not (lam > 0 and math.isfinite(lam)) for lam in self.lambdas):
            raise ValueError(f"lambdas must be positive finite numbers, got {self.lambdas}; use method 'single' for 0.")
        if self.batch_size < 1 or self.batch_size > self.n_train:
            raise ValueError(f"batch_size must be in [1, n_train={self.n_train}], got {self.batch_size}.")


@dataclass
class RunResult:
    """One trained run: its setting and the main task's losses at the best validation epoch."""

    relatedness: str
    method: str
    lam: float  #: lambda (0.0 for single-task training)
    seed: int
    best_epoch: int
    val_loss: float
    test_loss: float


@dataclass
class _Run:
    relatedness: str
    method: str
    lam: float
    seed: int


def _plan(cfg: SweepConfig) -> list[_Run]:
    runs: list[_Run] = []
    for method in cfg.methods:  # runs of a method are contiguous: one gate per method
        spec = METHODS[method]
        lams = (0.0,) if spec.single_task else cfg.lambdas
        for rel in cfg.relatedness[:1] if spec.single_task else cfg.relatedness:
            for lam in lams:
                for seed in cfg.seeds:
                    runs.append(_Run(rel, method, float(lam), int(seed)))
    return runs


def _epoch_permutations(seed: int, epoch: int, n: int) -> tuple[Tensor, Tensor]:
    g = _generator(seed, 1000 + epoch)
    return torch.randperm(n, generator=g), torch.randperm(n, generator=g)


def train_reference(
    relatedness: str, method: str, lam: float, seed: int, cfg: SweepConfig, steps: int
) -> RelatednessNet:
    """Train one run with a plain ``nn.Module`` and :meth:`GradientGate.backward` for ``steps`` steps.

    The independent reference the batched sweep is tested against (same data, order and init).
    """
    spec = METHODS[method]
    data = make_tasks(
        relatedness,
        seed,
        cfg.n_train,
        cfg.n_val,
        cfg.n_test,
        cfg.main_scale,
        cfg.aux_scale,
        cfg.input_dim,
        cfg.output_dim,
    )
    net = _init_net(seed, cfg.input_dim, cfg.output_dim, cfg.width, cfg.depth)
    gate = spec.gate(lam)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    per_epoch = cfg.n_train // cfg.batch_size
    for step in range(steps):
        epoch, b = divmod(step, per_epoch)
        perm_main, perm_aux = _epoch_permutations(seed, epoch, cfg.n_train)
        im = perm_main[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        ia = perm_aux[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        opt.zero_grad()
        loss_main = F.mse_loss(net.main_head(net.trunk(data.main_train[0][im])), data.main_train[1][im])
        loss_aux = F.mse_loss(net.aux_head(net.trunk(data.aux_train[0][ia])), data.aux_train[1][ia])
        gate.backward(
            loss_main,
            {"aux": loss_aux},
            net.trunk.parameters(),
            other_params=list(net.main_head.parameters()) + list(net.aux_head.parameters()),
        )
        opt.step()
    return net


def run_sweep(cfg: SweepConfig, max_steps: int | None = None, return_net: bool = False):
    """Train every run of the sweep (batched) and return one :class:`RunResult` per run.

    Runs whose early stopping has fired are dropped from the batch (with their optimizer and gate
    state) once they are a quarter of it, unless ``cfg.compact`` is false; their results are kept.
    ``max_steps`` stops after that many optimizer steps (for tests); with ``return_net`` the
    batched network of the runs still training is returned as well.
    """
    cfg.validate()
    runs = _plan(cfg)
    num_runs = len(runs)
    seeds = list(dict.fromkeys(r.seed for r in runs))
    combos = list(dict.fromkeys((r.seed, r.relatedness) for r in runs))
    datasets = {
        (s, rel): make_tasks(
            rel, s, cfg.n_train, cfg.n_val, cfg.n_test, cfg.main_scale, cfg.aux_scale, cfg.input_dim, cfg.output_dim
        )
        for s, rel in combos
    }
    # The main task depends on the seed only: keep one copy per seed.
    first = {s: datasets[next(c for c in combos if c[0] == s)] for s in seeds}
    xm = torch.stack([first[s].main_train[0] for s in seeds])
    ym = torch.stack([first[s].main_train[1] for s in seeds])
    xa = torch.stack([datasets[c].aux_train[0] for c in combos])
    ya = torch.stack([datasets[c].aux_train[1] for c in combos])
    seed_of = torch.tensor([seeds.index(r.seed) for r in runs])
    combo_of = torch.tensor([combos.index((r.seed, r.relatedness)) for r in runs])
    method_of = [r.method for r in runs]
    # lambda is applied by scaling each run's auxiliary gradient: every rule here is positively
    # homogeneous in g_aux and the cosine is scale-invariant, so this equals aux_weight=lambda.
    lam_of = torch.tensor([r.lam for r in runs])

    inits = {s: _init_net(s, cfg.input_dim, cfg.output_dim, cfg.width, cfg.depth) for s in seeds}
    net = _BatchedNet([inits[r.seed] for r in runs])
    opt = _adam(net.params(), cfg.lr)
    gates = {m: METHODS[m].gate(1.0) for m in cfg.methods}
    alive = torch.arange(num_runs)  # original index of each run still in the batch

    best_val = torch.full((num_runs,), math.inf)
    best_epoch = torch.zeros(num_runs, dtype=torch.long)
    bad_epochs = torch.zeros(num_runs, dtype=torch.long)
    stopped = torch.zeros(num_runs, dtype=torch.bool)
    best_params = [p.detach().clone() for p in net.params()]  # indexed by original run

    per_epoch = cfg.n_train // cfg.batch_size
    step = 0
    bar = _progress(cfg.max_epochs, cfg.progress and max_steps is None, desc=f"relatedness ({num_runs} runs)")
    for epoch in range(cfg.max_epochs):
        seed_idx, combo_idx, lam = seed_of[alive], combo_of[alive], lam_of[alive]
        groups = _groups([method_of[i] for i in alive.tolist()])
        trunk, head_main, head_aux = net.trunk_params(), net.head_params(0), net.head_params(1)
        n_trunk = len(trunk)
        perms = [_epoch_permutations(s, epoch, cfg.n_train) for s in seeds]
        pm = torch.stack([p[0] for p in perms])[seed_idx]  # (R, n)
        pa = torch.stack([p[1] for p in perms])[seed_idx]
        for b in range(per_epoch):
            if max_steps is not None and step >= max_steps:
                break
            bs = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            im, ia = pm[:, bs], pa[:, bs]
            x_main, y_main = xm[seed_idx[:, None], im], ym[seed_idx[:, None], im]  # (R, batch, dim)
            x_aux, y_aux = xa[combo_idx[:, None], ia], ya[combo_idx[:, None], ia]
            loss_main = _mse_per_run(net.forward(x_main, 0), y_main)
            loss_aux = _mse_per_run(net.forward(x_aux, 1), y_aux)
            g_main = torch.autograd.grad(loss_main.sum(), trunk + head_main)
            g_aux = torch.autograd.grad(loss_aux.sum(), trunk + head_aux)
            combined = [torch.empty_like(p) for p in trunk]
            for method, sl in groups:
                scale = lam[sl]
                aux_vec = [g[sl] * scale.reshape((-1,) + (1,) * (g.dim() - 1)) for g in g_aux[:n_trunk]]
                out, _ = gates[method].combine([g[sl] for g in g_main[:n_trunk]], {"aux": aux_vec}, batch_dims=1)
                for c, o in zip(combined, out):
                    c[sl] = o
            for p, g in zip(trunk + head_main + head_aux, combined + list(g_main[n_trunk:]) + list(g_aux[n_trunk:])):
                p.grad = g
            opt.step()
            step += 1
        if max_steps is not None and step >= max_steps:
            break
        val = _evaluate(net, [first[s].main_val for s in seeds], seed_idx)
        improved = (val < best_val[alive]) & ~stopped[alive]  # a stopped run's result is final
        best_val[alive] = torch.where(improved, val, best_val[alive])
        best_epoch[alive[improved]] = epoch + 1
        for bp, p in zip(best_params, net.params()):
            bp[alive[improved]] = p.detach()[improved]
        bad_epochs[alive] = torch.where(improved, torch.zeros_like(improved, dtype=torch.long), bad_epochs[alive] + 1)
        stopped[alive] |= bad_epochs[alive] >= cfg.patience
        bar.update(1)
        bar.set_postfix(active=int((~stopped).sum()), best_val=f"{float(best_val.median()):.4f}")
        if bool(stopped.all()):
            break
        keep = ~stopped[alive]
        if cfg.compact and int(keep.sum()) <= 0.75 * len(alive):
            net, opt = _compact(net, opt, gates, [method_of[i] for i in alive.tolist()], keep, cfg.lr)
            alive = alive[keep]
    bar.close()
    final_net = net
    test_net = _BatchedNet.from_tensors(best_params)
    if step == 0:
        test_net = net
    with torch.no_grad():
        test = _evaluate(test_net, [first[s].main_test for s in seeds], seed_of)
    results = [
        RunResult(r.relatedness, r.method, r.lam, r.seed, int(best_epoch[i]), float(best_val[i]), float(test[i]))
        for i, r in enumerate(runs)
    ]
    # Single-task runs do not depend on the auxiliary task: trained once, reported in every panel.
    for r in list(results):
        if METHODS[r.method].single_task:
            results += [replace(r, relatedness=rel) for rel in cfg.relatedness if rel != r.relatedness]
    if return_net:
        return results, final_net
    return results


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch without fused CPU Adam
        return torch.optim.Adam(params, lr=lr)


def _groups(methods: Sequence[str]) -> list[tuple[str, slice]]:
    """Contiguous ``(method, slice)`` blocks of the batch."""
    groups: list[tuple[str, slice]] = []
    start = 0
    for i in range(1, len(methods) + 1):
        if i == len(methods) or methods[i] != methods[start]:
            groups.append((methods[start], slice(start, i)))
            start = i
    return groups


def _compact(net: _BatchedNet, opt: torch.optim.Adam, gates: dict, methods: list[str], keep: Tensor, lr: float):
    """Drop the runs where ``keep`` is false from the network, the optimizer state and the gates' state."""
    old = net.params()
    new_net = _BatchedNet.from_tensors([p.detach()[keep] for p in old])
    new_opt = _adam(new_net.params(), lr)
    for p_old, p_new in zip(old, new_net.params()):
        state = opt.state.get(p_old)
        if state:
            new_opt.state[p_new] = {
                k: (v[keep].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()
            }
    for method, sl in _groups(methods):
        gate = gates[method]
        local = keep[sl]
        if gate.cosine_state.dim() > 0 and gate.cosine_state.shape[0] == len(local):
            gate.cosine_state = gate.cosine_state[local]
            gate.open_steps = gate.open_steps[local]
        for name in gate._direction_buffer_names():
            setattr(gate, name, getattr(gate, name)[local].clone())
    return new_net, new_opt


@torch.no_grad()
def _evaluate(
    net: _BatchedNet, data: list[tuple[Tensor, Tensor]], seed_idx: Tensor, chunk: int = 2000, run_chunk: int = 32
) -> Tensor:
    """Main-task MSE of every run on its seed's ``(x, y)``, in chunks of samples and runs (bounded memory)."""
    n = data[0][0].shape[0]
    num_runs = len(seed_idx)
    total = torch.zeros(num_runs)
    xs = torch.stack([d[0] for d in data])
    ys = torch.stack([d[1] for d in data])
    for r0 in range(0, num_runs, run_chunk):
        runs = slice(r0, min(r0 + run_chunk, num_runs))
        idx = seed_idx[runs]
        for start in range(0, n, chunk):
            x = xs[idx, start : start + chunk]
            y = ys[idx, start : start + chunk]
            total[runs] += (net.forward(x, 0, runs) - y).pow(2).sum(dim=(-1, -2))
    return total / (n * ys.shape[-1])


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: object) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr)


# ---------------------------------------------------------------------------------------- report
def summarize(results: Sequence[RunResult]) -> list[dict]:
    """Mean and standard error (over seeds) of the main task's test loss per setting."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for r in results:
        groups.setdefault((r.relatedness, r.method, r.lam), []).append(r.test_loss)
    rows = []
    for (rel, method, lam), values in groups.items():
        n = len(values)
        mean = sum(values) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
        rows.append({"relatedness": rel, "method": method, "lam": lam, "n": n, "mean": mean, "se": se})
    return rows


def markdown_table(summary: Sequence[dict]) -> str:
    """Rows: method and lambda; columns: relatedness; cells: ``mean ± s.e.`` of the test loss."""
    rels = [r for r in RELATEDNESS if any(s["relatedness"] == r for s in summary)]
    keys = list(dict.fromkeys((s["method"], s["lam"]) for s in summary))
    cell = {(s["relatedness"], s["method"], s["lam"]): s for s in summary}
    n_seeds = max(s["n"] for s in summary)
    lines = [
        f"Main-task test MSE, mean ± standard error over {n_seeds} seed(s) (lower is better).",
        "",
        "| method | lambda | " + " | ".join(rels) + " |",
        "|---|---|" + "---|" * len(rels),
    ]
    for method, lam in keys:
        cells = []
        for rel in rels:
            s = cell.get((rel, method, lam))
            cells.append("" if s is None else f"{s['mean']:.4f} ± {s['se']:.4f}")
        lam_text = "-" if METHODS[method].single_task else f"{lam:g}"
        lines.append(f"| {METHODS[method].label} | {lam_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: Sequence[dict], path: str) -> str:
    """The blog's figure: test loss against lambda, one line per method, one panel per relatedness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rels = [r for r in RELATEDNESS if any(s["relatedness"] == r for s in summary)]
    fig, axes = plt.subplots(1, len(rels), figsize=(5 * len(rels), 4), squeeze=False)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    for ax, rel in zip(axes[0], rels):
        rows = [s for s in summary if s["relatedness"] == rel]
        lams = sorted({s["lam"] for s in rows if s["lam"] > 0}) or [1.0]
        for method in methods:
            mrows = sorted((s for s in rows if s["method"] == method), key=lambda s: s["lam"])
            if not mrows:
                continue
            se = [0.0 if math.isnan(s["se"]) else s["se"] for s in mrows]
            if METHODS[method].single_task:
                m, e = mrows[0]["mean"], se[0]
                ax.axhline(m, color="k", linestyle="--", label=METHODS[method].label)
                ax.axhspan(m - e, m + e, color="k", alpha=0.1)
                continue
            ax.errorbar(
                [s["lam"] for s in mrows],
                [s["mean"] for s in mrows],
                yerr=se,
                marker="o",
                capsize=3,
                label=METHODS[method].label,
            )
        ax.set_xscale("log")
        ax.set_xticks(lams, [f"{v:g}" for v in lams])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("lambda (auxiliary weight)")
        ax.set_title(f"auxiliary task: {rel}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("main task test MSE")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: Sequence[RunResult], out: str) -> dict[str, str]:
    """Write ``runs.csv``, ``summary.csv``, ``table.md`` and ``relatedness.png`` under ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in ("runs.csv", "summary.csv", "table.md", "relatedness.png")}
    with open(paths["runs.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    summary = summarize(results)
    with open(paths["summary.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    with open(paths["table.md"], "w") as f:
        f.write(markdown_table(summary))
    plot_sweep(summary, paths["relatedness.png"])
    return paths


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,1,3, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    """``gradsim relatedness``: run the sweep and write the table and the figure."""
    parser = argparse.ArgumentParser(prog="gradsim relatedness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 10 with --full)")
    parser.add_argument("--lambdas", type=_floats, default=None, help="comma-separated lambdas (default 0.3,1,3)")
    parser.add_argument(
        "--methods",
        type=_names,
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)}, or 'all' "
        f"(default: the blog's third-claim comparison {','.join(CLAIM3_METHODS)})",
    )
    parser.add_argument(
        "--relatedness", type=_names, default=None, help="comma-separated subset of same,similar,unrelated"
    )
    parser.add_argument(
        "--full", action="store_true", help="the complete sweep (10 seeds, 6 lambdas, lr 1e-3, up to 150 epochs)"
    )
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=None, help="training vectors per task (default 1000)")
    parser.add_argument("--n-val", type=int, default=None, help="main-task validation vectors (default 1000)")
    parser.add_argument("--n-test", type=int, default=None, help="main-task test vectors (default 10000)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default="relatedness_out", help="output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SweepConfig.full() if args.full else SweepConfig()
    overrides: dict[str, object] = {}
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be at least 1, got {args.seeds}")
        overrides["seeds"] = tuple(range(args.seeds))
    for name in (
        "lambdas",
        "methods",
        "relatedness",
        "max_epochs",
        "patience",
        "lr",
        "batch_size",
        "n_train",
        "n_val",
        "n_test",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(METHODS) if name == "methods" and value == ("all",) else value
    overrides["progress"] = not args.no_progress
    cfg = replace(cfg, **overrides)  # type: ignore[arg-type]
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    results = run_sweep(cfg)
    paths = write_outputs(results, args.out)
    print(markdown_table(summarize(results)))
    claim = claim3_markdown(results)
    if "###" in claim:  # the sweep has the methods the claim needs
        paths["claim3.md"] = os.path.join(args.out, "claim3.md")
        with open(paths["claim3.md"], "w") as f:
            f.write(claim)
        print(claim)
    print(f"{len(results)} runs in {time.perf_counter() - start:.0f} s; wrote {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
