"""Many independent main + auxiliary runs of one network shape, trained in lock-step as one.

:class:`StackedRuns` holds ``R`` copies of a :class:`~lightning_gradsim.models.MultiHeadNet`
(one per run: a seed and a method, and a data ``group`` such as a class pair) as stacked
parameters ``(R, *shape)``. One training step is two batched forward/backward passes (the main
task's batch, then the auxiliary task's batch, each ``(R, B, ...)``: every run its own images)
through ``torch.func.vmap`` over ``torch.func.functional_call``, then, per method, one
:meth:`GradientGate.combine(..., batch_dims=1) <lightning_gradsim.GradientGate.combine>` over the
runs of that method, then one optimizer step over the stacked tensors. The runs never mix:

* each run's loss depends only on its own slice of the parameters, so the gradient of the sum of
  the runs' losses is, slice by slice, each run's own gradient;
* the optimizers (Adam, SGD, RMSprop without weight decay coupling across tensors) are
  element-wise, so one optimizer over stacked tensors is ``R`` optimizers;
* BatchNorm buffers are stacked too (each run keeps its own running statistics).

So a stacked run equals the same run trained alone with ``GradientGate.backward`` (the tests check
this against separate ``nn.Module`` runs). Per run and step it records the cosine between the main
and the auxiliary gradient on the shared parameters (the trunk) and whether the gate was open.

Example:

>>> import torch
>>> from lightning_gradsim.models import MultiHeadNet, tiny_cnn_trunk
>>> def make_net(seed):
...     torch.manual_seed(seed)
...     return MultiHeadNet(*tiny_cnn_trunk(1, width=4), tasks={"main": 2, "aux": 2})
>>> runs = [Run(0, seed, m) for seed in (0, 1) for m in ("main_only", "unweighted")]
>>> stack = StackedRuns(make_net, runs, lr=1e-3)
>>> x, y = torch.rand(4, 8, 1, 12, 12), torch.randint(2, (4, 8))
>>> stats = stack.step((x, y), (x, y))
>>> tuple(stats.cosine.shape), tuple(stack.accuracy(torch.rand(5, 1, 12, 12), torch.ones(5)).shape)
((4,), (4,))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods import make_gate

__all__ = ["Run", "StepStats", "StackedRuns", "EpochSampler"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}


@dataclass(frozen=True)
class Run:
    """One run: its data ``group`` (e.g. 0 = near pair, 1 = far pair), ``seed`` and ``method``."""

    group: int
    seed: int
    method: str


class StepStats(NamedTuple):
    """Per-run statistics of one step, shape ``(R,)`` each, on the parameters' device."""

    cosine: Tensor  #: cosine of the main and auxiliary gradients on the shared parameters
    gate_open: Tensor  #: bool, whether the auxiliary gradient was used on the shared parameters
    main_loss: Tensor
    aux_loss: Tensor


class StackedRuns:
    """``R`` independent main + auxiliary runs of one network shape trained together.

    Args:
        make_net: ``seed -> MultiHeadNet`` with heads ``"main"`` and ``"aux"``; called once per run
            (runs with the same seed start from the same weights, whatever their method).
        runs: the runs, in the order of the stacked dimension (each method's runs next to each
            other is fastest: they are then combined as views, without copies).
        optimizer: ``"adam"``, ``"sgd"`` or ``"rmsprop"`` (element-wise, so stacking is exact).
        lr: learning rate. optimizer_kwargs: more keyword arguments of the optimizer.
        gate: keyword arguments of every method's gate (:func:`~lightning_gradsim.methods.make_gate`).
        device: where parameters live; batches are moved there.
    """

    def __init__(
        self,
        make_net: Callable[[int], nn.Module],
        runs: Sequence[Run],
        optimizer: str = "adam",
        lr: float = 1e-3,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        gate: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not runs:
            raise ValueError("StackedRuns needs at least one run.")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}.")
        self.runs = list(runs)
        self.device = torch.device(device)
        nets = [make_net(r.seed).to(self.device) for r in self.runs]
        names = [n for n, _ in nets[0].named_parameters()]
        for task in ("main", "aux"):
            if not any(n.startswith(f"heads.{task}.") for n in names):
                raise ValueError(f"make_net must return a MultiHeadNet with a {task!r} head; it has {names}.")
        self.shared_names = [n for n in names if n.startswith("trunk.")]
        if not self.shared_names:
            raise ValueError("make_net's network has no trunk parameters to share between the tasks.")
        self.params = {
            n: torch.stack([dict(net.named_parameters())[n].detach() for net in nets]).requires_grad_() for n in names
        }
        self.buffers = {
            n: torch.stack([dict(net.named_buffers())[n] for net in nets]) for n, _ in nets[0].named_buffers()
        }
        self._base = copy.deepcopy(nets[0]).to("meta")
        self.optimizer = _OPTIMIZERS[optimizer](list(self.params.values()), lr=lr, **dict(optimizer_kwargs or {}))
        self.methods = list(dict.fromkeys(r.method for r in self.runs))
        from .heldout import base_method

        self.gates = {m: make_gate(base_method(m)[0], **dict(gate or {})) for m in self.methods}
        #: methods whose gate measures against the main head's gradient on a held-out reference batch
        self.heldout = {m for m in self.methods if base_method(m)[1]}
        # a method's runs as a slice (a view, no copy) when they are contiguous, else an index tensor
        self.method_index: dict[str, slice | Tensor] = {}
        for m in self.methods:
            rows = [i for i, r in enumerate(self.runs) if r.method == m]
            contiguous = rows == list(range(rows[0], rows[-1] + 1))
            self.method_index[m] = (
                slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=self.device)
            )

    def __len__(self) -> int:
        return len(self.runs)

    # ------------------------------------------------------------------ forward
    def logits(self, x: Tensor, task: str, index: Tensor | None = None, shared_input: bool = False) -> Tensor:
        """Logits ``(R', B, n)`` of the runs ``index`` (all by default) for inputs ``x``:
        ``(R', B, ...)``, or ``(B, ...)`` fed to every run when ``shared_input``."""
        params = self.params if index is None else {k: v[index] for k, v in self.params.items()}
        buffers = self.buffers if index is None else {k: v[index] for k, v in self.buffers.items()}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xx: Tensor) -> Tensor:
            return torch.func.functional_call(self._base, (p, b), (xx,), {"task": task})

        return torch.func.vmap(one, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x.to(self.device))

    def _losses(self, x: Tensor, y: Tensor, task: str) -> Tensor:
        logits = self.logits(x, task)
        y = y.to(self.device).long()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)

    # ------------------------------------------------------------------ training
    def _reference_gradients(self, reference: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """The main head's gradient on the shared parameters for each held-out run's reference batch, in
        train mode like the training batches; the BatchNorm running statistics are not updated (the forward
        reads copies of the buffers: a measurement only). Rows of other runs are zero."""
        rows = torch.tensor([i for i, r in enumerate(self.runs) if r.method in self.heldout], device=self.device)
        x, y = reference
        logits = self.logits(x.to(self.device)[rows], "main", index=rows)
        y = y.to(self.device)[rows].long()
        per_run = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        leaves = [self.params[n] for n in self.shared_names]
        g = torch.autograd.grad(per_run.sum(), leaves, allow_unused=True)
        return {n: torch.zeros_like(p) if gi is None else gi for n, p, gi in zip(self.shared_names, leaves, g)}

    def step(
        self, main: tuple[Tensor, Tensor], aux: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor] | None = None
    ) -> StepStats:
        """One step of every run: ``main`` and ``aux`` are ``(x (R, B, ...), y (R, B))`` batches; ``reference``:
        each run's held-out main-task batch, needed with a held-out method (its gate's cosines are measured
        against the main head's gradient there; :mod:`~lightning_gradsim.experiments.heldout`)."""
        if self.heldout and reference is None:
            raise ValueError(f"Held-out method(s) {sorted(self.heldout)}: pass step(main, aux, reference=(x, y)).")
        self._base.train()
        names = list(self.params)
        leaves = [self.params[n] for n in names]
        grads = {}
        losses = {}
        for task, (x, y) in (("main", main), ("aux", aux)):
            if x.shape[0] != len(self.runs) or y.shape[:1] != x.shape[:1]:
                raise ValueError(
                    f"The {task} batch must be (R={len(self.runs)}, B, ...) with labels (R, B); "
                    f"got {tuple(x.shape)}, {tuple(y.shape)}."
                )
            per_run = self._losses(x, y, task)
            g = torch.autograd.grad(per_run.sum(), leaves, allow_unused=True)
            grads[task] = {n: torch.zeros_like(p) if gi is None else gi for n, p, gi in zip(names, leaves, g)}
            losses[task] = per_run.detach()
        ref_grads = None
        if self.heldout and reference is not None:
            ref_grads = self._reference_gradients(reference)
        cosine = torch.zeros(len(self.runs), device=self.device)
        gate_open = torch.zeros(len(self.runs), dtype=torch.bool, device=self.device)
        shared = {n: torch.empty_like(self.params[n]) for n in self.shared_names}
        for method, idx in self.method_index.items():
            main_list = [grads["main"][n][idx] for n in self.shared_names]
            aux_list = [grads["aux"][n][idx] for n in self.shared_names]
            ref = None
            if method in self.heldout and ref_grads is not None:
                ref = [ref_grads[n][idx] for n in self.shared_names]
            combined, stats = self.gates[method].combine(main_list, {"aux": aux_list}, batch_dims=1, reference=ref)
            for n, c in zip(self.shared_names, combined):
                shared[n][idx] = c
            cosine[idx] = stats.cosine[..., 0].to(cosine.dtype)
            gate_open[idx] = stats.gate_open[..., 0]
        for n in names:
            self.params[n].grad = shared[n] if n in shared else grads["main"][n] + grads["aux"][n]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(cosine, gate_open, losses["main"], losses["aux"])

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor, index: Tensor | None = None, batch_size: int = 512) -> Tensor:
        """Main-task accuracy ``(R',)`` of the runs ``index`` (all by default) on one shared test set
        ``x (N, ...)``, ``y (N,)``, in eval mode (BatchNorm uses each run's running statistics)."""
        self._base.eval()
        try:
            correct = None
            for i in range(0, len(y), batch_size):
                pred = self.logits(x[i : i + batch_size], "main", index, shared_input=True).argmax(-1)
                hits = (pred == y[i : i + batch_size].to(self.device).long()).sum(1)
                correct = hits if correct is None else correct + hits
        finally:
            self._base.train()
        assert correct is not None, "empty test set"
        return correct.double() / len(y)


class EpochSampler:
    """Seeded shuffled batches of ``range(n)``: a new permutation every epoch, the last partial
    batch of an epoch dropped (unless ``n < batch_size``: then each batch is a whole permutation).

    >>> s = EpochSampler(5, 2, seed=0)
    >>> first_epoch = torch.cat([s.next(), s.next()])      # 4 distinct indices; the 5th waits
    >>> len(set(first_epoch.tolist())), len(s.next())
    (4, 2)
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"EpochSampler needs n >= 1 and batch_size >= 1, got {n}, {batch_size}.")
        self.n, self.batch_size = n, min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)
        self._perm = torch.randperm(n, generator=self.generator)
        self._pos = 0

    def next(self) -> Tensor:
        if self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        out = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out
