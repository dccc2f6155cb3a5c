"""``LossWeighting``: weights on the task *losses* (learned or adapted), composed with any gate.

A loss weighting multiplies each task's loss by ``w_i * lambda_i`` (``w`` its weights, main task
first; ``lambda`` its fixed prior, ``aux_weight``) before the gate takes the per-task gradients.
The gate then does what it always does on those weighted losses (statistics, rule, transforms,
heads), so a weighting composes with any rule: ``GradientGate(rule="sum", loss_weighting=...)`` is
the plain method, ``rule="unweighted"`` gates the weighted auxiliary gradients by their cosine.

Hooks a weighting may implement, in the order the gate calls them:

* :meth:`check` (before any gradient is taken): refuse tasks or parameters it cannot work with;
* :meth:`loss_weights`: the ``K`` weights of this step (may carry autograd history: parameters
  of the weighting, e.g. log-variances, then get their gradient through the heads' path);
* :meth:`observe` (after the rule, before anything is written): the step's loss values and
  per-layer Gramian of the weighted gradients, as reduced by the transforms (global under DDP and
  accumulation), e.g. to adapt the weights;
* :meth:`regularizer`: a term that reaches only the weighting's own parameters; its gradient is
  added once per optimizer step, unscaled (never through the loss scale or the accumulation mean).

>>> import torch
>>> from lightning_gradsim import GradientGate
>>> class Halve(LossWeighting):
...     def loss_weights(self, num_tasks, like):
...         return [torch.ones((), dtype=like.dtype)] + [torch.full((), 0.5, dtype=like.dtype)] * (num_tasks - 1)
>>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
>>> stats = GradientGate(rule="sum", loss_weighting=Halve()).backward((w * w).sum(), [w.sum()], [w])
>>> w.grad, stats.weight
(tensor([2.5000, 0.5000]), tensor([0.5000]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..rules.base import ShapedOnLoad

__all__ = ["LossWeighting", "check_aux_weight"]


def check_aux_weight(aux_weight: float | Mapping[str, float]) -> float | dict[str, float]:
    """``aux_weight`` as a float or a ``{task: float}`` dict; refuses NaN, inf and negative values.

    >>> check_aux_weight({"rot": 0.5})
    {'rot': 0.5}
    """
    if isinstance(aux_weight, Mapping):
        items = {str(k): v for k, v in aux_weight.items()}
    else:
        items = {"": aux_weight}
    out: dict[str, float] = {}
    for name, value in items.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            and not (isinstance(value, Tensor) and value.numel() == 1)
        ):
            raise TypeError(f"aux_weight{'[' + repr(name) + ']' if name else ''} must be a number, got {value!r}.")
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(
                f"aux_weight{'[' + repr(name) + ']' if name else ''} must be a finite number >= 0, got {value!r}: "
                "it multiplies the auxiliary gradient (0 switches the task off)."
            )
        out[name] = v
    return out[""] if not isinstance(aux_weight, Mapping) else out


class LossWeighting(ShapedOnLoad, nn.Module):
    """Base class of loss weightings (see the module docstring).

    Attributes:
        aux_weight: the fixed prior lambda: one number, or ``{task: lambda}``.
    """

    #: Needs the per-layer Gramian of the *parameter* gradients (so no ``similarity="features"``,
    #: no reused steps of ``every_n_steps``); the gate refuses those options at construction.
    needs_parameter_gramian: bool = False
    #: Needs the step's loss values, reduced with the gradients (``TaskGradients.losses``).
    needs_losses: bool = False

    def __init__(self, aux_weight: float | Mapping[str, float] = 1.0) -> None:
        super().__init__()
        self.aux_weight = check_aux_weight(aux_weight)

    # ------------------------------------------------------------------ hooks
    def check(self, names: Sequence[str], shared: Sequence[Tensor]) -> None:
        """Raise a clear error if the tasks (auxiliary ``names``) or shared tensors do not fit."""

    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        """The ``K`` weights ``w`` on [main, aux...] for this step, as 0-d tensors.

        Compute each from its own graph nodes (e.g. ``exp(-s[i])`` per task, not one ``exp(-s)``
        unbound): tasks that share autograd nodes make the gate take its slower shared-graph path.
        """
        raise NotImplementedError

    def observe(
        self,
        losses: Tensor | None,
        layer_gram: Tensor,
        layers: Sequence[int],
        shared: Sequence[Tensor],
        weights: Tensor,
        finite: Tensor,
    ) -> None:
        """After the rule: ``losses`` ``(K,)`` (raw, reduced), ``layer_gram`` ``(L, K, K)`` of the weighted
        per-task gradients on ``shared[layers[l]]``, this step's ``weights`` ``w`` and its finiteness."""

    def regularizer(self) -> Tensor | None:
        """A term added to the total loss that reaches only the weighting's own parameters."""
        return None

    def extra_metrics(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Scalars to log (``{name: 0-d tensor}``) given all task names, main first."""
        return {}

    def reset(self) -> None:
        """Forget adapted state (``gate.reset_state()`` calls it)."""

    # ------------------------------------------------------------------ helpers
    def own_parameters(self) -> list[Tensor]:
        """Parameters of the weighting itself that the user's optimizer trains."""
        return [p for p in self.parameters() if p.requires_grad]

    def lambda_values(self, names: Sequence[str]) -> list[float]:
        """The ``K`` fixed prior weights: 1 for the main task, ``aux_weight`` for the auxiliary ``names``."""
        if isinstance(self.aux_weight, dict):
            missing = [n for n in names if n not in self.aux_weight]
            if missing:
                raise ValueError(
                    f"The loss weighting's aux_weight names tasks {sorted(self.aux_weight)} but the auxiliary "
                    f"tasks are {list(names)}; give one weight per auxiliary task name."
                )
            return [1.0] + [float(self.aux_weight[n]) for n in names]
        return [1.0] + [float(self.aux_weight)] * len(names)

    def lambdas(self, names: Sequence[str], like: Tensor) -> Tensor:
        """:meth:`lambda_values` as a ``(K,)`` tensor like ``like``."""
        return torch.tensor(self.lambda_values(names), dtype=like.dtype, device=like.device)
