"""Random loss weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022, *Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning*), a :class:`LossWeighting`.

At every optimizer step the task weights (main included) are drawn afresh as::

    w = scale * softmax(z),   z ~ N(0, I_K)

(the paper's and LibMTL's default distribution; ``scale = 1``: the weights sum to 1, as published;
``scale = K`` makes their mean 1). The draws come from the weighting's own generator, seeded with
``seed`` and advanced once per optimizer step (after the step is observed), so every DDP rank draws
the same weights, accumulated micro-batches share one draw, and a resumed run draws what the
uninterrupted one would have (the generator's state is in ``state_dict``).

>>> import torch
>>> rlw = RLW(seed=0)
>>> w = torch.stack(rlw.loss_weights(3, torch.zeros(())))
>>> w.shape, round(float(w.sum()), 5), bool((w > 0).all())
(torch.Size([3]), 1.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.gate import GradientGate
from ..core.loss_weighting import LossWeighting
from ..core.streams import check_keys, keyed_generators
from ._gate import weighting_gate

__all__ = ["make_gate", "RLW"]


class RLW(LossWeighting):
    """Random loss weighting (Lin et al., 2022); see the module docstring.

    Args:
        seed: seed of the weighting's generator (the same on every rank).
        scale: the weights' sum (1 as published).
        aux_weight: fixed prior ``lambda`` multiplying the auxiliary losses.

    Buffers: ``task_weights`` ``(K,)`` (this step's draw), ``draws`` (count); the generator's state
    is the extra state. Logged as ``gradsim/task_weight/<task>``.
    ``make_gate("rlw", ...)`` builds ``GradientGate(rule="sum", loss_weighting=RLW(...))``.
    """

    shaped_on_load = ("task_weights",)

    task_weights: Tensor
    draws: Tensor
    #: The next draw happens in ``observe``, once per measured parameter step: the gate refuses
    #: ``similarity="features"`` and ``every_n_steps > 1`` with RLW at construction.
    needs_parameter_gramian = True

    def __init__(self, seed: int = 0, scale: float = 1.0, aux_weight: float | Mapping[str, float] = 1.0) -> None:
        super().__init__(aux_weight=aux_weight)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}.")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        self.seed, self.scale = seed, float(scale)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        #: one key per problem of a batch (:meth:`batched_weights`), or ``None``: draw from ``generator``.
        self.problem_keys: tuple[int, ...] | None = None
        self.register_buffer("task_weights", torch.zeros(0))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def draw(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A new ``scale * softmax(z)`` of ``shape`` (``(*B, K)``), ``z`` standard normal, on ``like``'s device;
        with :attr:`problem_keys`, each problem's ``z`` from its own stream keyed by (``seed``, key, draws so far)."""
        keys = self.problem_keys
        if keys is not None and len(keys) == math.prod(shape[:-1]):
            streams = keyed_generators(self.seed, keys, int(self.draws))
            z = torch.stack([torch.randn(shape[-1], generator=g, dtype=torch.float64) for g in streams]).reshape(shape)
        else:
            z = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        self.draws.add_(1)
        return (self.scale * torch.softmax(z, dim=-1)).to(dtype=dtype, device=like.device)

    def loss_weights(self, num_tasks: int, like: Tensor) -> list[Tensor]:
        self._ensure((num_tasks,), like)
        return list(self.task_weights.clone().unbind(-1))

    def batched_weights(
        self, batch: tuple[int, ...], num_tasks: int, like: Tensor, keys: Sequence[int] | None = None
    ) -> Tensor:
        """This step's ``(*batch, K)`` weights of independent problems (e.g. stacked runs), one draw each;
        :meth:`observe_losses` draws the next ones. ``keys`` (one int per problem, e.g. each stacked run's
        seed): every problem draws from its own stream, so its weights do not depend on the other problems."""
        if keys is not None:
            self.problem_keys = check_keys(keys, math.prod(batch))
        self._ensure(tuple(batch) + (num_tasks,), like)
        return self.task_weights.clone()

    def observe_losses(self, losses: Tensor, finite: Tensor) -> None:
        """After a step of :meth:`batched_weights`: draw the next weights (:meth:`step`)."""
        self.step()

    def _ensure(self, shape: tuple[int, ...], like: Tensor) -> None:
        if tuple(self.task_weights.shape) == shape:
            return
        if self.draws > 0 and self.task_weights.numel():
            raise ValueError(
                f"RLW has weights of shape {tuple(self.task_weights.shape)} but this step has {shape} "
                "(problems, tasks); call gate.reset_state() to start over."
            )
        self.task_weights = self.draw(shape, like)

    def observe(
        self,
        losses: Tensor | None,
        layer_gram: Tensor,
        layers: Sequence[int],
        shared: Sequence[Tensor],
        weights: Tensor,
        finite: Tensor,
    ) -> None:
        self.step()

    def step(self) -> None:
        """Draw the next step's weights (called once per optimizer step, finite or not)."""
        self.task_weights = self.draw(tuple(self.task_weights.shape), self.task_weights)

    def extra_metrics(self, names: Sequence[str]) -> dict[str, Tensor]:
        """``task_weight/<task>`` for the monitor."""
        if tuple(self.task_weights.shape) != (len(names),):
            return {}
        return {f"task_weight/{n}": self.task_weights[i] for i, n in enumerate(names)}

    def reset(self) -> None:
        """Back to the seed: the same draws as a fresh weighting."""
        self.generator.manual_seed(self.seed)
        self.task_weights = torch.zeros(0, device=self.draws.device)
        self.draws.zero_()

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        if state and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return f"seed={self.seed}, scale={self.scale}, aux_weight={self.aux_weight}"


def make_gate(**kwargs: Any) -> GradientGate:
    """The method ``rlw`` of :func:`lightning_gradsim.methods.make_gate`: ``make_gate("rlw", seed=0, scale=1.0,
    aux_weight=1.0, rule="sum")`` (``seed`` seeds the gate and the draws)."""
    seed = kwargs.get("seed", 0)

    def build(**rest: Any) -> RLW:
        return RLW(seed=seed, **rest)

    return weighting_gate("rlw", build, kwargs)
