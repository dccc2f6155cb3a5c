"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018) as a drop-in for the gate.

Each task ``i`` (main included) has a learnable log-variance ``s_i`` and the total loss is::

    L = sum_i exp(-s_i) * lambda_i * L_i + s_i

(``lambda_main = 1``, ``lambda_aux = aux_weight``). This is the form most reproductions use
(e.g. LibMTL) for every task. The paper derives ``exp(-s) L + s / 2`` for a softmax classifier
(its approximation ``1/sigma^2 L + log sigma`` with ``s = log sigma^2``) and ``exp(-s) L / 2 +
s / 2`` for Gaussian regression; both are the form above up to a factor on ``s`` or a global factor
of 1/2, i.e. our regulariser is twice the paper's classification one. ``s`` is an ``nn.Parameter``
of the gate, so it is in your LightningModule's ``parameters()`` and your optimizer trains it
(``d L / d s_i = 1 - exp(-s_i) lambda_i L_i``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..methods import register_method
from ._weighting import LossWeightingGate, drop_cosine_options

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(LossWeightingGate):
    """Learn one log-variance per task and weight the losses by ``exp(-s_i)`` (Kendall et al., 2018).

    Args:
        aux_tasks: the number of auxiliary tasks, or their names (checked at every step). The
            log-variances are created here so that ``configure_optimizers`` sees them.
        aux_weight: fixed prior ``lambda`` on the auxiliary losses (1 keeps the paper's method).
        init_log_var: initial ``s_i`` (0 means weight 1).
        seed: unused (kept for a uniform ``make_gate`` signature).

    Attributes:
        log_vars: ``nn.Parameter`` of shape ``(1 + num_aux,)``, ``[s_main, s_aux...]``.

    Logged by :class:`~lightning_gradsim.GradSimMonitor`: ``gradsim/log_var/<task>`` (``s_i``) and
    ``gradsim/task_weight/<task>`` (``exp(-s_i) * lambda_i``) for ``main`` and every auxiliary task.

    Example::

        class Net(GradSimMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                ...
                self.gradsim = UncertaintyWeighting(aux_tasks=["rotated"])

            def configure_optimizers(self):          # self.parameters() includes log_vars
                return torch.optim.Adam(self.parameters(), lr=1e-3)
    """

    def __init__(
        self,
        aux_tasks: int | Sequence[str] = 1,
        aux_weight: float | Mapping[str, float] = 1.0,
        init_log_var: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(aux_weight=aux_weight, seed=seed)
        if isinstance(aux_tasks, int):
            if aux_tasks < 1:
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

    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        if num_tasks != self.log_vars.numel():
            raise ValueError(
                f"UncertaintyWeighting was built for {self.log_vars.numel() - 1} auxiliary task(s) but got "
                f"{num_tasks - 1}: pass aux_tasks={num_tasks - 1} (or the list of names) when you create it."
            )
        if (
            self.expected_aux_names is not None
            and self.aux_names is not None
            and self.aux_names != self.expected_aux_names
        ):
            raise ValueError(
                f"UncertaintyWeighting was built for auxiliary tasks {self.expected_aux_names} but got "
                f"{self.aux_names}; pass the same names in the same order."
            )
        return [torch.exp(-self.log_vars[i]) for i in range(num_tasks)]  # one graph per task

    def extra_loss(self, like: Tensor) -> Tensor:
        return self.log_vars.sum()

    def extra_metrics(self) -> dict[str, Tensor]:
        """``log_var/<task>`` and ``task_weight/<task>`` for the monitor."""
        names = self._task_names()
        if len(names) != self.log_vars.numel():
            return {}
        s = self.log_vars.detach()
        lam = self.lambdas(names[1:], s)
        w = torch.exp(-s) * lam
        out: dict[str, Tensor] = {}
        for i, name in enumerate(names):
            out[f"log_var/{name}"] = s[i]
            out[f"task_weight/{name}"] = w[i]
        return out

    def extra_repr(self) -> str:
        return f"aux_tasks={self.log_vars.numel() - 1}, aux_weight={self.aux_weight}"


@register_method("uncertainty")
def _make_uncertainty(**kwargs) -> UncertaintyWeighting:
    """``make_gate("uncertainty", aux_tasks=..., aux_weight=..., init_log_var=...)``."""
    return UncertaintyWeighting(**drop_cosine_options("uncertainty", kwargs))
