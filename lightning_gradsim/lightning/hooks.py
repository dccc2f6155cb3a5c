"""What a ``GradSimMixin`` module defines or may override: the shared parameters, the task losses, the
held-out reference, and how the gate is called. (:class:`~lightning_gradsim.GradSimMixin` adds the Lightning
side: ``training_step``, optimizers, checkpoints.)

>>> GradSimHooks().gradsim_transforms().items, GradSimHooks().gradsim_reference()
([], None)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lightning.pytorch import Trainer
from torch import Tensor

from ..core.gate import GateStats, GradientGate
from ..core.transforms import Transforms
from .reference import datamodule_reference_loader

__all__ = ["GradSimHooks"]


class GradSimHooks:
    """The hooks of :class:`~lightning_gradsim.GradSimMixin` (see the module docstring)."""

    #: The step's transforms, (FSDP2) its sharded parameters and its reference loss, set in ``training_step``.
    _gradsim_step_transforms: Transforms | None = None
    _gradsim_step_params: tuple[list[Tensor], list[Tensor]] | None = None
    _gradsim_step_reference: Tensor | None = None

    def shared_parameters(self) -> Iterable[Tensor]:
        """The parameters every task shares (the backbone). Override this."""
        raise NotImplementedError(
            f"{type(self).__name__} must define shared_parameters(), returning the backbone's parameters, "
            "e.g. `return self.trunk.parameters()`."
        )

    def task_losses(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        """Return ``{"main": main_loss, "<aux name>": aux_loss, ...}`` for this batch. Override this."""
        raise NotImplementedError(
            f"{type(self).__name__} must define task_losses(batch, batch_idx) returning a dict with a "
            "'main' loss and one loss per auxiliary task."
        )

    def reference_loss(self, batch: Any) -> Tensor:
        """Optional: the main task's loss on a held-out *reference* batch (of the training data, never the
        validation or test set). Define it and each auxiliary cosine is measured against this loss's gradient
        instead of the training batch's (``gate.backward(..., reference_loss=...)``); batches come from
        :meth:`gradsim_reference_dataloader`, one per measured step."""
        raise NotImplementedError

    def gradsim_reference_dataloader(self) -> Any:
        """Where :meth:`reference_loss`'s batches come from: ``trainer.datamodule.reference_dataloader()``."""
        return datamodule_reference_loader(self._trainer_or_none())

    def gradsim_backward(
        self, gate: GradientGate, main_loss: Tensor, aux_losses: Mapping[str, Tensor]
    ) -> GateStats | None:
        """Run the gate and fill ``.grad``; override to customise how gradients are obtained.

        An override must pass ``transforms=self.gradsim_transforms()`` and
        ``reference_loss=self.gradsim_reference()`` to ``gate.backward`` (the step's accumulation,
        unscaling, DDP all-reduce and held-out reference) and return what it returns.
        """
        shared, others = self.gradsim_parameters()
        return gate.backward(
            main_loss,
            aux_losses,
            shared,
            other_params=others,
            transforms=self.gradsim_transforms(),
            reference_loss=self.gradsim_reference(),
        )

    def gradsim_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        """The trainable shared parameters and the others (heads...), as the gate takes them. Under FSDP2
        these are the sharded parameters, taken at the start of the step (FSDP2 puts gathered copies in
        the modules from a forward to its backward)."""
        if self._gradsim_step_params is not None:
            return self._gradsim_step_params
        shared = [p for p in self.shared_parameters() if p.requires_grad]
        if not shared:
            raise ValueError(
                f"{type(self).__name__}.shared_parameters() returned no trainable parameter: return the "
                "backbone's parameters, e.g. `return self.trunk.parameters()`."
            )
        shared_ids = {id(p) for p in shared}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in shared_ids]  # type: ignore[attr-defined]
        return shared, others

    def gradsim_transforms(self) -> Transforms:
        """The gradient transforms of the current step (empty outside ``training_step``)."""
        return self._gradsim_step_transforms or Transforms()

    def gradsim_reference(self) -> Tensor | None:
        """This step's held-out reference loss (``None`` without :meth:`reference_loss`, or on a step that
        reuses weights)."""
        return self._gradsim_step_reference

    def _trainer_or_none(self) -> Trainer | None:
        try:
            return self.trainer  # type: ignore[attr-defined]
        except RuntimeError:
            return None
