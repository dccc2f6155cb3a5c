"""How a gate is saved and loaded: its extra state (task names, layout version), checkpoints of version
0.1.0 (keys moved into the state module and the loss weighting), and the former attributes of the gate
that now live in its state (``gate.cosine_state``, ``gate.step``, ``gate.main_grad_ema_0``, ...).

:class:`GradientGate` is a :class:`CheckpointedGate`; the state itself is
:class:`~lightning_gradsim.core.state.GateState`, a submodule, so ``state_dict`` carries it.

>>> from lightning_gradsim import GradientGate
>>> gate = GradientGate()
>>> gate.get_extra_state(), int(gate.step)  # gate.step is gate.state.step
({'aux_names': None, 'version': 2}, 0)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .state import LEGACY_BUFFERS, upgrade_legacy_keys

__all__ = ["CheckpointedGate"]

_STATE_NAMES = frozenset(LEGACY_BUFFERS)


class CheckpointedGate(nn.Module):
    """The checkpoint side of :class:`~lightning_gradsim.GradientGate` (see the module docstring)."""

    aux_names: list[str] | None
    loss_weighting: Any

    def get_extra_state(self) -> Any:
        return {"aux_names": self.aux_names, "version": 2}

    def set_extra_state(self, state: Any) -> None:
        if state:
            self.aux_names = state.get("aux_names")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints of version 0.1 (before the state module and composed loss weightings): move their keys.
        upgrade_legacy_keys(state_dict, prefix, self.loss_weighting, strict, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # Former attributes of the gate, now in its state: gate.cosine_state, gate.step, gate.main_grad_ema_0, ...
    def __getattr__(self, name: str) -> Any:
        if name in _STATE_NAMES or name.startswith("main_grad_ema_"):
            return getattr(self._modules["state"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in _STATE_NAMES or name.startswith("main_grad_ema_")) and "state" in self.__dict__.get("_modules", {}):
            setattr(self._modules["state"], name, value)
        else:
            super().__setattr__(name, value)
