"""What a ``GradSimMixin`` module adds to, and reads from, a Lightning checkpoint.

* a half-accumulated window (``gradsim_accumulate_grad_batches > 1``): ``checkpoint["gradsim_accumulator"]``;
* under ``gradsim_sync="sharded"`` the projection direction EMA, kept whole (each rank holds shards);
* a checkpoint with no state for a gate (e.g. saved by the same network without the mixin): a fresh
  gate, with a warning.

The gate's own state (smoothed cosine, direction EMA, counters, reused weights) is part of the
module's ``state_dict``; nothing else is needed for an exact resume.

>>> from lightning_gradsim.core import Accumulate
>>> checkpoint = {"state_dict": {}}
>>> load_step_state(object(), checkpoint, Accumulate())  # no gate in a plain object: nothing to do
>>> checkpoint
{'state_dict': {}}
"""

from __future__ import annotations

import warnings
from typing import Any

from ..core.gate import GradientGate
from ..core.transforms import Accumulate
from .strategy import whole_directions

__all__ = ["save_step_state", "load_step_state"]


def save_step_state(module: Any, checkpoint: dict[str, Any], accumulator: Accumulate, sharded: bool) -> None:
    """Add the mixin's step state to ``checkpoint`` (``on_save_checkpoint``)."""
    if sharded and isinstance(checkpoint.get("state_dict"), dict):
        whole_directions(module, checkpoint["state_dict"])  # checkpoints keep the direction EMA whole
    window = accumulator.state_dict()
    if window:
        checkpoint["gradsim_accumulator"] = window


def load_step_state(module: Any, checkpoint: dict[str, Any], accumulator: Accumulate) -> None:
    """Read the mixin's step state from ``checkpoint`` (``on_load_checkpoint``); fill in a fresh state for
    a gate the checkpoint has none for."""
    accumulator.load_state_dict(checkpoint.get("gradsim_accumulator", {}))
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or not hasattr(module, "named_modules"):
        return
    for name, sub in module.named_modules():
        prefix = name + "."
        if isinstance(sub, GradientGate) and name and not any(key.startswith(prefix) for key in state_dict):
            warnings.warn(
                f"The checkpoint has no state for the gate `{name}` (was it saved by a module without "
                "GradSimMixin?): starting a fresh gate (no smoothed cosine, counters at 0).",
                UserWarning,
                stacklevel=3,
            )
            state_dict.update(sub.state_dict(prefix=prefix))
