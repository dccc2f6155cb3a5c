"""Best-epoch model selection: keep the weights of the best validation, test those.

"Trained ... with early stopping" and a reported *test* metric (the projection blog's CelebA AUC)
means: validate after every epoch, remember the weights of the epoch with the best validation
metric, and report the test metric of *those* weights. :class:`BestEpoch` does this in memory
(no checkpoint files); ``gradsim compare`` uses it when its config has ``select:``.

Example:

>>> best_index([0.61, 0.70, 0.69, 0.70], mode="max")   # ties: the earliest
1
>>> best_index([0.9, 0.4, 0.5], mode="min")
1
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback
from torch import nn

__all__ = ["best_index", "BestEpoch"]


def best_index(values: Sequence[float], mode: str = "max") -> int:
    """Index of the best finite value (``mode`` ``"max"`` or ``"min"``); the earliest on ties."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    best, index = None, -1
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        if best is None or (v > best if mode == "max" else v < best):
            best, index = v, i
    if index < 0:
        raise ValueError("No finite validation value to select from; did validation run?")
    return index


class BestEpoch(Callback):
    """After each validation, record ``monitor`` and keep a copy of the weights when it improves.

    Args:
        monitor: a logged validation metric, e.g. ``"val/auroc"``.
        mode: ``"max"`` or ``"min"``.

    After ``fit``, :meth:`restore` loads the best weights into the module; ``history`` holds
    ``(global_step, value)`` per validation and ``best`` the index of the selected one.
    """

    def __init__(self, monitor: str = "val/auroc", mode: str = "max") -> None:
        super().__init__()
        best_index([0.0], mode)  # validates mode
        self.monitor = monitor
        self.mode = mode
        self.history: list[tuple[int, float]] = []
        self.best: int = -1
        self._state: dict[str, Any] | None = None

    def on_validation_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            logged = sorted(trainer.callback_metrics)
            raise KeyError(f"BestEpoch monitors {self.monitor!r} but validation logged {logged}.")
        self.history.append((int(trainer.global_step), float(trainer.callback_metrics[self.monitor])))
        best = best_index([v for _, v in self.history], self.mode)
        if best == len(self.history) - 1:
            self.best = best
            self._state = copy.deepcopy(pl_module.state_dict())

    def restore(self, module: nn.Module) -> None:
        """Load the weights of the best validation into ``module``."""
        if self._state is None:
            raise RuntimeError("BestEpoch.restore: no validation has run, so there are no best weights.")
        module.load_state_dict(self._state)

    @property
    def best_step(self) -> int:
        return self.history[self.best][0] if self.best >= 0 else -1

    @property
    def best_value(self) -> float:
        return self.history[self.best][1] if self.best >= 0 else math.nan
