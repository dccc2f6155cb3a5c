"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019, *End-to-End Multi-Task Learning with
Attention*, section 3.3), a :class:`LossWeighting`.

Each task ``i`` (main included) is weighted by::

    w_i(t) = K exp(r_i(t-1) / T) / sum_j exp(r_j(t-1) / T),   r_i(t-1) = L_i(t-1) / L_i(t-2)

(``K`` tasks, temperature ``T = 2`` as in the paper), so a task whose loss fell more slowly gets more
weight; ``w_i = 1`` for the first two periods. ``L_i(t)`` is the mean *raw* (unweighted) loss of
task ``i`` over period ``t``: ``period`` optimizer steps (1, the default, is the paper's iteration
index; the authors' code and LibMTL use one epoch: pass ``period = steps per epoch``).

The losses are the step's global ones (averaged over accumulated micro-batches and DDP ranks with
``gradsim_sync = "global"``), so every rank takes the same weights, equal to one process on the
whole batch; a non-finite step is not recorded. The weights change only between optimizer steps.

>>> import torch
>>> dwa = DWA(temperature=2.0)
>>> for losses in ([1.0, 1.0], [0.5, 1.0]):  # the main loss halved, the auxiliary one did not move
...     dwa.record(torch.tensor(losses), torch.tensor(True))
>>> dwa.task_weights  # 2 softmax((0.5, 1) / 2)
tensor([0.8756, 1.1244])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.gate import GradientGate
from ..core.loss_weighting import LossWeighting
from ._gate import weighting_gate

__all__ = ["make_gate", "DWA", "dwa_weights"]


def dwa_weights(previous: Tensor, before: Tensor, temperature: float = 2.0) -> Tensor:
    """``K softmax((previous / before) / T)`` over the last dimension (the tasks).

    >>> dwa_weights(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), temperature=1.0)
    tensor([0.5379, 1.4621])
    """
    safe = torch.where(before != 0, before, torch.ones_like(before))
    ratio = torch.where(before != 0, previous / safe, torch.ones_like(previous))
    return previous.shape[-1] * torch.softmax(ratio / temperature, dim=-1)


class DWA(LossWeighting):
    """Dynamic weight average (Liu et al., 2019); see the module docstring.

    Args:
        temperature: ``T`` (2 in the paper; larger is closer to equal weights).
        period: optimizer steps whose mean loss is one ``L_i(t)`` (1: every step).
        aux_weight: fixed prior ``lambda`` multiplying the auxiliary losses (the adapted ``w`` multiply
            ``lambda_i L_i``).

    Buffers: ``task_weights`` ``(K,)`` (``[w_main, w_aux...]``, used for the next step),
    ``period_losses`` ``(2, K)`` (the means of the last two complete periods, oldest first),
    ``running`` ``(K,)`` (the sum over the current period), ``running_steps`` and ``periods``
    (counts). Logged by :class:`~lightning_gradsim.GradSimMonitor` as ``gradsim/task_weight/<task>``.
    ``make_gate("dwa", ...)`` builds ``GradientGate(rule="sum", loss_weighting=DWA(...))``.
    """

    shaped_on_load = ("task_weights", "period_losses", "running")

    task_weights: Tensor
    period_losses: Tensor
    running: Tensor
    running_steps: Tensor
    periods: Tensor
    needs_losses = True
    #: The losses arrive through ``observe``, which the gate calls on every measured parameter step:
    #: the gate refuses ``similarity="features"`` and ``every_n_steps > 1`` with DWA at construction.
    needs_parameter_gramian = True

    def __init__(
        self, temperature: float = 2.0, period: int = 1, aux_weight: float | Mapping[str, float] = 1.0
    ) -> None:
        super().__init__(aux_weight=aux_weight)
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1 (optimizer steps), got {period!r}.")
        self.temperature = float(temperature)
        self.period = period
        for name in ("task_weights", "period_losses", "running"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("running_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("periods", torch.zeros((), dtype=torch.long))

    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        self._ensure(num_tasks, like)
        return list(self.task_weights.clone().unbind(-1))

    def _ensure(self, num_tasks: int, like: Tensor, batch: tuple[int, ...] = ()) -> None:
        shape = batch + (num_tasks,)
        if tuple(self.task_weights.shape) == shape:
            return
        if self.periods > 0 or self.running_steps > 0:
            raise ValueError(
                f"DWA has weights of shape {tuple(self.task_weights.shape)} but this step has {shape} "
                "(problems, tasks); call gate.reset_state() to start over."
            )
        dtype = like.dtype if like.is_floating_point() else torch.float32
        self.task_weights = torch.ones(shape, dtype=dtype, device=like.device)
        self.period_losses = torch.zeros((2,) + shape, dtype=dtype, device=like.device)
        self.running = torch.zeros(shape, dtype=dtype, device=like.device)

    def batched_weights(
        self, batch: tuple[int, ...], num_tasks: int, like: Tensor, keys: Sequence[int] | None = None
    ) -> Tensor:
        """The ``(*batch, K)`` weights of independent problems (e.g. stacked runs), each with its own
        loss history; :meth:`record` their ``(*batch, K)`` losses after each step. ``keys`` is accepted as
        RLW takes it and not needed: DWA draws nothing, a problem's weights come from its own losses."""
        self._ensure(num_tasks, like, tuple(batch))
        return self.task_weights.clone()

    def observe_losses(self, losses: Tensor, finite: Tensor) -> None:
        """After a step of :meth:`batched_weights`: record the problems' losses (:meth:`record`)."""
        self.record(losses, finite)

    def observe(
        self,
        losses: Tensor | None,
        layer_gram: Tensor,
        layers: Sequence[int],
        shared: Sequence[Tensor],
        weights: Tensor,
        finite: Tensor,
    ) -> None:
        assert losses is not None
        self.record(losses, finite)

    def record(self, losses: Tensor, finite: Tensor) -> None:
        """Record one optimizer step's raw losses ``(*B, K)`` (global, reduced); nothing if not ``finite``.

        Completes a period every ``period`` finite steps and then sets the weights of the next ones.
        """
        self._ensure(losses.shape[-1], losses, tuple(losses.shape[:-1]))
        losses = losses.to(self.running.dtype)
        ok = finite.all() & torch.isfinite(losses).all()
        self.running.copy_(torch.where(ok, self.running + losses, self.running))
        self.running_steps.add_(ok.long())
        done = ok & (self.running_steps == self.period)
        mean = self.running / self.period
        shifted = torch.stack([self.period_losses[1], mean])
        self.period_losses.copy_(torch.where(done, shifted, self.period_losses))
        self.periods.add_(done.long())
        self.running.copy_(torch.where(done, torch.zeros_like(self.running), self.running))
        self.running_steps.copy_(torch.where(done, torch.zeros_like(self.running_steps), self.running_steps))
        new = dwa_weights(self.period_losses[1], self.period_losses[0], self.temperature)
        self.task_weights.copy_(torch.where(done & (self.periods >= 2), new, self.task_weights))

    def extra_metrics(self, names: Sequence[str]) -> dict[str, Tensor]:
        """``task_weight/<task>`` for the monitor."""
        if tuple(self.task_weights.shape) != (len(names),):
            return {}
        return {f"task_weight/{n}": self.task_weights[i] for i, n in enumerate(names)}

    def reset(self) -> None:
        device = self.periods.device
        for name in ("task_weights", "period_losses", "running"):
            setattr(self, name, torch.zeros(0, device=device))
        self.running_steps.zero_()
        self.periods.zero_()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, period={self.period}, aux_weight={self.aux_weight}"


def make_gate(**kwargs: Any) -> GradientGate:
    """The method ``dwa`` of :func:`lightning_gradsim.methods.make_gate`: ``make_gate("dwa", temperature=2.0,
    period=1, aux_weight=1.0, seed=0, rule="sum")``."""
    return weighting_gate("dwa", DWA, kwargs)
