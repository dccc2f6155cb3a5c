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

Command line (:mod:`.relatedness_cli`; writes ``runs.csv``, ``summary.csv``, ``table.md``,
``relatedness.png``, ``claim3.md``)::

    gradsim relatedness --seeds 3 --lambdas 0.3,1,3 --out relatedness_out
    gradsim relatedness --full --out relatedness_full

Python::

    from lightning_gradsim.experiments.relatedness import SweepConfig, run_sweep
    rows = run_sweep(SweepConfig(seeds=(0, 1), lambdas=(0.3, 1.0), max_epochs=5))
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .relatedness_report import markdown_table, plot_sweep, summarize, write_outputs
from .relatedness_setup import (
    BLOG_ALPHA,
    CLAIM3_METHODS,
    METHODS,
    RELATEDNESS,
    BatchedNet,
    MethodSpec,
    RelatednessNet,
    RunResult,
    TaskData,
    init_net,
    make_tasks,
    mse_per_run,
    seeded_generator,
    task_matrices,
)

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
    "write_outputs",
]


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
    g = seeded_generator(seed, 1000 + epoch)
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
    net = init_net(seed, cfg.input_dim, cfg.output_dim, cfg.width, cfg.depth)
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

    inits = {s: init_net(s, cfg.input_dim, cfg.output_dim, cfg.width, cfg.depth) for s in seeds}
    net = BatchedNet([inits[r.seed] for r in runs])
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
            loss_main = mse_per_run(net.forward(x_main, 0), y_main)
            loss_aux = mse_per_run(net.forward(x_aux, 1), y_aux)
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
    test_net = BatchedNet.from_tensors(best_params)
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


def _compact(net: BatchedNet, opt: torch.optim.Adam, gates: dict, methods: list[str], keep: Tensor, lr: float):
    """Drop the runs where ``keep`` is false from the network, the optimizer state and the gates' state."""
    old = net.params()
    new_net = BatchedNet.from_tensors([p.detach()[keep] for p in old])
    new_opt = _adam(new_net.params(), lr)
    for p_old, p_new in zip(old, new_net.params()):
        state = opt.state.get(p_old)
        if state:
            new_opt.state[p_new] = {
                k: (v[keep].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()
            }
    for method, sl in _groups(methods):
        gates[method].state.select_problems(keep[sl])
    return new_net, new_opt


@torch.no_grad()
def _evaluate(
    net: BatchedNet, data: list[tuple[Tensor, Tensor]], seed_idx: Tensor, chunk: int = 2000, run_chunk: int = 32
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
