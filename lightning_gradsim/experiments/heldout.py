"""Held-out versions of the gates in ``gradsim table1`` and ``gradsim pairs`` (issue 23, ours: not the paper's).

A method ``<rule>_heldout`` (``unweighted_heldout``, ``weighted_heldout``) is the gate ``<rule>``
measuring each auxiliary cosine -- and so deciding -- against the main task's gradient on a batch of
the *held-out reference split* (part of the training data, never the test set) instead of the
training batch's main gradient; the update stays ``g_main + sum_k w_k g_k`` of the training batch
(:meth:`GradientGate.combine(..., reference=...) <lightning_gradsim.GradientGate.combine>`).

Fairness: when any held-out method is in a command, the reference split
(:data:`~lightning_gradsim.data.REFERENCE_FRACTION` of the training images, fixed before any result)
is cut for *every* method of that command (:func:`reference_fraction_for`), so all of them train on
the same remaining images, with the same seeds, and are compared by the same paired tests.

>>> base_method("weighted_heldout:threshold=0.1"), base_method("unweighted")
(('weighted', True), ('unweighted', False))
>>> reference_fraction_for(["main_only", "sum"]), reference_fraction_for(["sum", "unweighted_heldout"])
(0.0, 0.1)
>>> order = ReferenceOrder(seeds=[0, 1, 0], n=10, batch_size=4)
>>> idx = order.next()
>>> tuple(idx.shape), bool(torch.equal(idx[0], idx[2]))
((3, 4), True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..data import REFERENCE_FRACTION

__all__ = ["HELDOUT_SUFFIX", "HELDOUT_METHODS", "base_method", "reference_fraction_for", "ReferenceOrder"]

HELDOUT_SUFFIX = "_heldout"
#: the held-out gates the experiments document (any ``<gradient rule>_heldout`` is accepted).
HELDOUT_METHODS = ("unweighted_heldout", "weighted_heldout")
#: added to a run's seed to seed its reference batches (distinct from its init and data-order seeds).
_REFERENCE_ORDER_OFFSET = 2_000_003


def base_method(method: str) -> tuple[str, bool]:
    """``(gate method, held-out?)`` of a method name (options after ``:`` are ignored; ``torchjd:<Name>`` is
    a name)."""
    name = method.strip() if method.startswith("torchjd:") else method.split(":", 1)[0].strip()
    if name.endswith(HELDOUT_SUFFIX) and len(name) > len(HELDOUT_SUFFIX):
        return name[: -len(HELDOUT_SUFFIX)], True
    return name, False


def reference_fraction_for(methods: Sequence[str]) -> float:
    """The share of the training data held out as the reference split for a command running ``methods``:
    :data:`~lightning_gradsim.data.REFERENCE_FRACTION` if any is held-out (for every method alike), else 0."""
    return REFERENCE_FRACTION if any(base_method(m)[1] for m in methods) else 0.0


class ReferenceOrder:
    """Per-run reference batches: each step, every run draws ``batch_size`` of the ``n`` reference images
    (seeded shuffles, a new one per pass, partial batch dropped); runs with the same seed draw the same."""

    def __init__(self, seeds: Sequence[int], n: int, batch_size: int, device: str | torch.device = "cpu") -> None:
        from .stacked import EpochSampler  # (stacked imports this module)

        unique = sorted({int(s) for s in seeds})
        self._samplers = [EpochSampler(n, batch_size, _REFERENCE_ORDER_OFFSET + s) for s in unique]
        self._position = torch.tensor([unique.index(int(s)) for s in seeds], device=device)
        self.device = device

    def next(self) -> Tensor:
        """``(R, B')`` indices into the reference split: one batch per run."""
        return torch.stack([s.next() for s in self._samplers]).to(self.device)[self._position]
