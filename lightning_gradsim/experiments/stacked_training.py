"""One training step for many stacked runs: per-run data order, per-method gates, one RMSprop.

The runs of a :class:`~lightning_gradsim.experiments.stacked_mlp.StackedMLP` are split into
contiguous :class:`RunGroup` s, one per method; each group has its own
:class:`~lightning_gradsim.GradientGate` whose state is batched over the group's runs, and gates
every run's main and auxiliary gradients on the shared trunk with
``gate.combine(main, aux, batch_dims=1)``. Heads get their own task's gradient, as
``gate.backward`` gives them. With a single task the step is plain single-task training.

A run does not depend on what else is stacked with it (bitwise, on one machine): its
initialisation and data order come from its own seeded generators, every matmul is one batch
element of a batched matmul, and the gate is handed each run's trunk gradient as *one* flat vector
(all layers concatenated), so its Gramian is one batched matmul per run and not a sum over
per-layer Gramians -- a reduction over ``(layers, runs, ...)`` whose summation path depends on how
many runs share the group. Gates with ``per_layer=True`` or a per-tensor rule (``gradvac`` with
``per_tensor=True``) need the per-layer Gramians: they get the per-layer tensors, and their runs
can differ in the last bits with the group's size. Random methods (PCGrad's visiting orders, torchjd's
random weightings, RLW's weights) draw each run's numbers from a stream keyed by the run's seed
(``combine(..., problem_keys=...)``, ``RLW.batched_weights(..., keys=...)``), not by its place in the
group, so runs with the same seed draw alike whatever their angle, as they share initialisation and data.

Example:

>>> from lightning_gradsim.methods import make_gate
>>> from lightning_gradsim.experiments.stacked_mlp import StackedMLP
>>> model = StackedMLP(seeds=[0, 1, 0, 1], input_dim=4, hidden=5, depth=2)
>>> groups = [RunGroup("sum", make_gate("sum"), slice(0, 2)),
...           RunGroup("unweighted", make_gate("unweighted"), slice(2, 4))]
>>> trainer = StackedTrainer(model, groups, lr=1e-3)
>>> record = trainer.step(torch.rand(4, 2, 6, 4), torch.randint(0, 10, (4, 2, 6)))
>>> tuple(record.cosine.shape), tuple(record.loss.shape)
((4, 1), (4, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.gate import GateStats, GradientGate
from .stacked_mlp import StackedMLP, TaskGradients

__all__ = ["RunGroup", "StepRecord", "StackedTrainer", "RunOrder", "order_seed"]


def order_seed(seed: int) -> int:
    """Seed of a run's data-order generator (distinct from its initialisation generator's ``seed``)."""
    return 1_000_003 + int(seed)


class RunOrder:
    """Per-run data order: each epoch, every run visits the ``n`` training images in its own seeded order.

    Runs with the same seed see the same order. :meth:`epoch` returns ``(R, n)`` indices.

    >>> order = RunOrder(seeds=[0, 1, 0], n=5)
    >>> idx = order.epoch()
    >>> tuple(idx.shape), bool(torch.equal(idx[0], idx[2])), sorted(idx[1].tolist())
    ((3, 5), True, [0, 1, 2, 3, 4])
    """

    def __init__(self, seeds: Sequence[int], n: int, device: str | torch.device = "cpu") -> None:
        unique = sorted({int(s) for s in seeds})
        self._generators = [torch.Generator().manual_seed(order_seed(s)) for s in unique]
        self._position = torch.tensor([unique.index(int(s)) for s in seeds], device=device)
        self.n = n
        self.device = device

    def epoch(self) -> Tensor:
        perms = torch.stack([torch.randperm(self.n, generator=g) for g in self._generators]).to(self.device)
        return perms[self._position]

    def state_dict(self) -> dict[str, list[Tensor]]:
        """The generators' states (to continue the same orders after a restart)."""
        return {"generators": [g.get_state() for g in self._generators]}

    def load_state_dict(self, state: dict[str, list[Tensor]]) -> None:
        if len(state["generators"]) != len(self._generators):
            raise ValueError(f"{len(state['generators'])} saved generators for {len(self._generators)} seeds.")
        for g, saved in zip(self._generators, state["generators"]):
            g.set_state(saved)


@dataclass(frozen=True)
class RunGroup:
    """The runs ``runs`` (a slice of the stacked runs) trained with one method's ``gate``; ``reference``:
    the gate measures its cosines against the main head's gradient on a held-out reference batch."""

    label: str
    gate: GradientGate
    runs: slice
    reference: bool = False


class StepRecord(NamedTuple):
    """One step's per-run numbers (tensors on the model's device; no host sync)."""

    loss: Tensor  #: ``(R, T)`` mean cross-entropy per task
    #: ``(R, T-1)`` cosine of each auxiliary gradient with the main one on the trunk (with the held-out
    #: reference gradient for a ``reference`` group: the cosine the gate decided on)
    cosine: Tensor
    gate_open: Tensor  #: ``(R, T-1)`` bool, whether the gate used the auxiliary gradient


class StackedTrainer:
    """RMSprop over the stacked parameters, with one gate per :class:`RunGroup`.

    Args:
        model: the stacked runs.
        groups: contiguous run groups covering every run once (ignored with one task).
        lr, alpha, eps: ``torch.optim.RMSprop``'s (PyTorch defaults for ``alpha`` and ``eps``).
        aux_names: names of the auxiliary tasks handed to the gates (``T - 1`` of them).
    """

    def __init__(
        self,
        model: StackedMLP,
        groups: Sequence[RunGroup] = (),
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        aux_names: Sequence[str] = ("rotated",),
    ) -> None:
        self.model = model
        self.groups = list(groups)
        self.aux_names = list(aux_names)
        self._sizes = [p[0].numel() for p in model.trunk]  # per-run numbers of each trunk tensor
        if model.num_tasks > 1:
            if len(self.aux_names) != model.num_tasks - 1:
                raise ValueError(f"{model.num_tasks - 1} auxiliary task(s) but aux_names={self.aux_names}.")
            covered = sorted(i for g in self.groups for i in range(*g.runs.indices(model.num_runs)))
            if covered != list(range(model.num_runs)):
                raise ValueError("The run groups must cover every stacked run exactly once.")
        # The optimizer sees each group's slice of the trunk as its own leaf view (sharing the
        # stacked storage), so a group's combined gradient becomes its ``.grad`` without a copy.
        if model.num_tasks > 1:
            self._trunk_views = [[p.detach()[g.runs].requires_grad_() for p in model.trunk] for g in self.groups]
        else:
            self._trunk_views = [[p.detach().requires_grad_() for p in model.trunk]]
        self._head_views = [p.detach().requires_grad_() for p in model.heads]
        params = [p for views in self._trunk_views for p in views] + self._head_views
        self.optimizer = torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps)

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor, reference: tuple[Tensor, Tensor] | None = None) -> StepRecord:
        """One optimizer step of every run on ``x`` ``(R, T, B, D)``, labels ``y`` ``(R, T, B)``.

        ``reference``: ``(x (R, B', D), y (R, B'))``, each run's held-out batch of the main task, needed
        when a group has ``reference=True`` (its gate measures the cosines against the main head's
        gradient there, :meth:`GradientGate.combine(..., reference=...) <lightning_gradsim.GradientGate.combine>`).
        """
        if reference is None and any(g.reference for g in self.groups):
            raise ValueError("A run group measures against a held-out reference: pass step(x, y, reference=(x, y)).")
        grads = self.model.task_gradients(x, y)
        for p, g in zip(self._head_views, grads.heads):
            p.grad = g
        r, t = grads.loss.shape
        if t == 1:
            for p, g in zip(self._trunk_views[0], grads.trunk):
                p.grad = g[:, 0]
            empty = grads.loss.new_zeros(r, 0)
            self.optimizer.step()
            return StepRecord(grads.loss, empty, empty.bool())
        cosine = grads.loss.new_empty(r, t - 1)
        gate_open = torch.empty(r, t - 1, dtype=torch.bool, device=grads.loss.device)
        for group, views in zip(self.groups, self._trunk_views):
            sl = group.runs
            keys = self.model.seeds[sl]  # a random method's draws follow the run, not its place in the group
            lw = group.gate.loss_weighting
            combined: Tensor | list[Tensor]
            ref = None
            if group.reference and reference is not None:  # a held-out gate: its runs' reference gradients
                ref = self.model.head_trunk_gradient(reference[0][sl], reference[1][sl], sl, task=0)
            if lw is not None:
                combined, stats = _weighted_combine(group, grads, self.aux_names, keys)
            elif group.gate.per_layer or group.gate.rule.per_tensor_weights or ref is not None:
                # per layer: the per-layer cosines; a per-tensor rule (GradVac's per_tensor); a reference
                main = [g[sl, 0] for g in grads.trunk]
                aux = {name: [g[sl, k + 1] for g in grads.trunk] for k, name in enumerate(self.aux_names)}
                combined, stats = group.gate.combine(main, aux, batch_dims=1, reference=ref, problem_keys=keys)
            else:  # one flat vector per run and task: the Gramian is one matmul per run (see the module doc)
                flat = torch.cat([g[sl].flatten(2) for g in grads.trunk], dim=2)  # (R_g, T, P)
                aux_flat = {name: flat[:, k + 1] for k, name in enumerate(self.aux_names)}
                whole, stats = group.gate.combine(flat[:, 0], aux_flat, batch_dims=1, problem_keys=keys)
                combined = [c.view(p.shape) for c, p in zip(torch.split(whole, self._sizes, dim=1), views)]  # type: ignore[arg-type]
            for p, c in zip(views, combined):
                p.grad = c
            cosine[sl] = stats.cosine
            gate_open[sl] = stats.gate_open
        self.optimizer.step()
        return StepRecord(grads.loss, cosine, gate_open)


def _weighted_combine(
    group: RunGroup, grads: TaskGradients, aux_names: list[str], keys: list[int]
) -> tuple[list[Tensor], GateStats]:
    """A gate with a loss weighting (one that has ``batched_weights``: DWA, RLW) over its runs: every task's
    gradients (trunk and heads) scaled by the run's ``w_i lambda_i``, as the weighted losses would give
    them, then the gate's rule on the scaled trunk gradients; the weighting observes the runs' losses."""
    gate, sl = group.gate, group.runs
    lw = gate.loss_weighting
    assert lw is not None
    loss = grads.loss[sl]
    r, t = loss.shape
    scale = lw.batched_weights((r,), t, loss, keys=keys) * lw.lambdas(aux_names, loss)
    for h in grads.heads:  # (R, T, ...): task t's gradient of head t, weighted like its loss
        view = h[sl]
        view.mul_(scale.reshape(scale.shape + (1,) * (view.dim() - 2)).to(view.dtype))
    main = [g[sl, 0] * scale[:, :1].reshape((r,) + (1,) * (g.dim() - 2)) for g in grads.trunk]
    aux = {
        name: [g[sl, k + 1] * scale[:, k + 1 : k + 2].reshape((r,) + (1,) * (g.dim() - 2)) for g in grads.trunk]
        for k, name in enumerate(aux_names)
    }
    combined, stats = gate.combine(main, aux, batch_dims=1, weights_applied=True, problem_keys=keys)  # weighted
    lw.observe_losses(loss.detach(), stats.finite.all())
    return combined, stats  # type: ignore[return-value]
