"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), a :class:`LossWeighting`.

Each task ``i`` (main included) has a learnable log-variance ``s_i`` and the total loss is::

    L = sum_i exp(-s_i) * lambda_i * L_i + s_i

(``lambda_main = 1``, ``lambda_aux = aux_weight``). This is the form most reproductions use
(e.g. LibMTL) for every task. The paper derives ``exp(-s) L + s / 2`` for a softmax classifier
(its approximation ``1/sigma^2 L + log sigma`` with ``s = log sigma^2``) and ``exp(-s) L / 2 +
s / 2`` for Gaussian regression; both are the form above up to a factor on ``s`` or a global factor
of 1/2, i.e. our regulariser is twice the paper's classification one. ``s`` is an ``nn.Parameter``
of the weighting (so of the gate, so of your LightningModule) and your optimizer trains it
(``d L / d s_i = 1 - exp(-s_i) lambda_i L_i``; the ``+ 1`` of the regulariser is added once per
optimizer step, outside any loss scale or accumulation mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.gate import GradientGate
from ..core.loss_weighting import LossWeighting
from ._gate import weighting_gate

__all__ = ["make_gate", "UncertaintyWeighting"]


class UncertaintyWeighting(LossWeighting):
    """Learn one log-variance per task and weight the losses by ``exp(-s_i)`` (Kendall et al., 2018).

    Args:
        aux_tasks: the number of auxiliary tasks, or their names (checked at every step). The
            log-variances are created here so that ``configure_optimizers`` sees them.
        aux_weight: fixed prior ``lambda`` on the auxiliary losses (1 keeps the paper's method).
        init_log_var: initial ``s_i`` (0 means weight 1).

    Attributes:
        log_vars: ``nn.Parameter`` of shape ``(1 + num_aux,)``, ``[s_main, s_aux...]``.

    Logged by :class:`~lightning_gradsim.GradSimMonitor`: ``gradsim/log_var/<task>`` (``s_i``) and
    ``gradsim/task_weight/<task>`` (``exp(-s_i) * lambda_i``) for ``main`` and every auxiliary task.
    ``make_gate("uncertainty", aux_tasks=[...])`` builds ``GradientGate(rule="sum", loss_weighting=...)``.

    >>> from lightning_gradsim import GradientGate
    >>> gate = GradientGate(rule="sum", loss_weighting=UncertaintyWeighting(aux_tasks=["rotated"]))
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    >>> stats = gate.backward((w * w).sum(), {"rotated": 3 * w.sum()}, [w])
    >>> gate.loss_weighting.log_vars.grad  # 1 - exp(-s) lambda L at s = 0, L = (1, 3)
    tensor([ 0., -2.])
    """

    def __init__(
        self,
        aux_tasks: int | Sequence[str] = 1,
        aux_weight: float | Mapping[str, float] = 1.0,
        init_log_var: float = 0.0,
    ) -> None:
        super().__init__(aux_weight=aux_weight)
        if isinstance(aux_tasks, bool) or isinstance(aux_tasks, int):
            if isinstance(aux_tasks, bool) or aux_tasks < 1:
                raise ValueError(f"aux_tasks must be >= 1 (the number of auxiliary tasks), got {aux_tasks}.")
            num_aux, names = aux_tasks, None
        elif isinstance(aux_tasks, str):
            raise TypeError(
                f"aux_tasks must be a count or a list of names; got the string {aux_tasks!r} (use [{aux_tasks!r}])."
            )
        else:
            names = [str(n) for n in aux_tasks]
            if not names:
                raise ValueError("aux_tasks is empty: give the auxiliary tasks' names or their number.")
            num_aux = len(names)
        self.expected_aux_names = names
        self.log_vars = nn.Parameter(torch.full((1 + num_aux,), float(init_log_var)))

    def check(self, names: Sequence[str], shared: Sequence[Tensor]) -> None:
        if len(names) + 1 != self.log_vars.numel():
            raise ValueError(
                f"UncertaintyWeighting was built for {self.log_vars.numel() - 1} auxiliary task(s) but got "
                f"{len(names)}: pass aux_tasks={len(names)} (or the list of names) when you create it."
            )
        if self.expected_aux_names is not None and list(names) != self.expected_aux_names:
            raise ValueError(
                f"UncertaintyWeighting was built for auxiliary tasks {self.expected_aux_names} but got "
                f"{list(names)}; pass the same names in the same order."
            )

    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        return [torch.exp(-self.log_vars[i]) for i in range(num_tasks)]  # one graph per task

    def regularizer(self) -> Tensor:
        return self.log_vars.sum()

    def extra_metrics(self, names: Sequence[str]) -> dict[str, Tensor]:
        """``log_var/<task>`` and ``task_weight/<task>`` for the monitor."""
        if len(names) != self.log_vars.numel():
            return {}
        s = self.log_vars.detach()
        w = torch.exp(-s) * self.lambdas(names[1:], s)
        out: dict[str, Tensor] = {}
        for i, name in enumerate(names):
            out[f"log_var/{name}"] = s[i]
            out[f"task_weight/{name}"] = w[i]
        return out

    def extra_repr(self) -> str:
        return f"aux_tasks={self.log_vars.numel() - 1}, aux_weight={self.aux_weight}"


def make_gate(**kwargs: Any) -> GradientGate:
    """The method ``uncertainty`` of :func:`lightning_gradsim.methods.make_gate`: ``make_gate("uncertainty",
    aux_tasks=..., aux_weight=..., init_log_var=..., seed=..., rule="sum")``."""
    return weighting_gate("uncertainty", UncertaintyWeighting, kwargs)
