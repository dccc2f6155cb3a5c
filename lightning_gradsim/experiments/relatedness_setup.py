"""The synthetic task-relatedness setup: the tasks, the batched network and the sweep's methods.

The tasks and network of :mod:`lightning_gradsim.experiments.relatedness` (the projection blog's
third experiment): ``y = sigma * tanh(B x)`` regressions whose matrices are the same, similar or
unrelated; a 4-layer ReLU trunk with one linear head per task, batched over runs; the methods the
sweep compares (:data:`METHODS`) and one run's result (:class:`RunResult`).

>>> from lightning_gradsim.experiments.relatedness_setup import METHODS, task_matrices
>>> METHODS["projection_alpha0.01"].main_grad_ema
0.99
>>> main, aux = task_matrices("same", seed=0)
>>> bool((main == aux).all()), tuple(main.shape)
(True, (100, 250))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.gate import GradientGate
from ..methods import make_gate
from ..rules import Rule
from .ema_cosine import DirectionUnweighted, DirectionWeighted

__all__ = [
    "RELATEDNESS",
    "METHODS",
    "CLAIM3_METHODS",
    "BLOG_ALPHA",
    "MethodSpec",
    "TaskData",
    "RunResult",
    "task_matrices",
    "make_tasks",
    "RelatednessNet",
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
def seeded_generator(seed: int, stream: int) -> torch.Generator:
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
    b_main = torch.randn(output_dim, input_dim, generator=seeded_generator(seed, 0)) * math.sqrt(b_var)
    if relatedness == "same":
        return b_main, b_main.clone()
    if relatedness == "similar":
        noise = torch.randn(output_dim, input_dim, generator=seeded_generator(seed, 1)) * math.sqrt(noise_var)
        return b_main, b_main + noise
    return b_main, torch.randn(output_dim, input_dim, generator=seeded_generator(seed, 2)) * math.sqrt(b_var)


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
    gen_main = seeded_generator(seed, 10)
    main_train = _regression(b_main, main_scale, n_train, gen_main)
    main_val = _regression(b_main, main_scale, n_val, gen_main)
    main_test = _regression(b_main, main_scale, n_test, gen_main)
    aux_train = _regression(b_aux, aux_scale, n_train, seeded_generator(seed, 20 + RELATEDNESS.index(relatedness)))
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


def init_net(seed: int, input_dim: int, output_dim: int, width: int, depth: int) -> RelatednessNet:
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init, without touching the global RNG
        torch.manual_seed(seed)
        return RelatednessNet(input_dim, output_dim, width, depth)


def mse_per_run(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).mean(dim=(-1, -2))


class BatchedNet:
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
    def from_tensors(cls, params: Sequence[Tensor]) -> BatchedNet:
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
