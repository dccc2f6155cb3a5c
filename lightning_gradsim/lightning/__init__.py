"""The Lightning side (the only package of the library that imports ``lightning``).

* :class:`GradSimMixin` (:mod:`.mixin`): a ``LightningModule`` mixin whose ``training_step`` runs the gate;
* :mod:`.validation`: what the mixin refuses or warns about, checked once before training, and the
  one host sync per step that decides whether the optimizer steps;
* :mod:`.strategy`: the trainer's parallelism -> the sync mode's transform (:mod:`lightning_gradsim.parallel`);
* :mod:`.optimization`: optimizers, LR schedulers, clipping and the GradScaler under manual optimization;
* :class:`GradSimMonitor` (:mod:`.monitor`): the per-step cosine and gate state, logged and drawn.

>>> from lightning_gradsim.lightning import GradSimMixin, GradSimMonitor
>>> GradSimMixin.gradsim_sync
'global'
"""

from __future__ import annotations

from .mixin import GradSimMixin
from .monitor import GradSimMonitor
from .validation import NonFiniteLossError

__all__ = ["GradSimMixin", "GradSimMonitor", "NonFiniteLossError"]
