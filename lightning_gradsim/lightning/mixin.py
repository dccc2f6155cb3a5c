"""``GradSimMixin``: gradient-similarity training for a LightningModule, with no loop to write."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule
from torch import Tensor

from ..core.gate import MAIN_TASK, GateStats, GradientGate
from ..core.transforms import Accumulate, GradientTransform, Transforms, Unscale
from ..parallel.registry import check_sync_buffers, check_sync_mode
from .checkpoints import load_step_state, save_step_state
from .hooks import GradSimHooks
from .optimization import (
    EpochSchedulerStepper,
    active_scaler,
    keep_scheduler_monitors,
    optimizer_list,
    scheduler_monitors,
    step_optimizers,
    step_schedulers,
    update_scaler,
)
from .reference import ReferenceBatches
from .strategy import GradSimSetup, sharded_directions, sync_module_buffers, sync_transform
from .validation import (
    NonFiniteLossError,
    check_buffers,
    check_task_losses,
    check_trainer,
    ends_window,
    finite_step,
    gate_of,
    parallel_mode,
    world_size_of,
)

__all__ = ["GradSimMixin", "NonFiniteLossError"]


class GradSimMixin(GradSimHooks):
    """Mix into a ``LightningModule`` to train a main task with gated auxiliary tasks.

    Define ``self.gradsim`` (a :class:`~lightning_gradsim.GradientGate`), :meth:`shared_parameters`
    (the backbone the tasks share) and :meth:`task_losses` (a dict with a ``"main"`` loss and one
    loss per auxiliary task). The mixin switches on manual optimization and provides
    ``training_step``: it runs the gate over the shared parameters, steps the optimizer(s) and the
    LR schedulers as their config asks (interval and frequency), clips the combined gradient if
    asked, skips steps with a non-finite loss or gradient, and logs the losses.

    Settings (class or instance attributes):
        gradsim_clip_val: clip the combined gradient to this norm (or value); ``None`` for no
            clipping. ``Trainer(gradient_clip_val=...)`` is refused in manual optimization.
        gradsim_clip_algorithm: ``"norm"`` or ``"value"``.
        gradsim_on_nonfinite: ``"skip"`` (warn once per task, count, skip the step) or ``"raise"``.
        gradsim_log_losses: log ``train/loss/<task>`` and ``train/loss`` every step.
        gradsim_accumulate_grad_batches: accumulate each task's gradients over this many
            micro-batches and run the gate once on the sums (``Trainer(accumulate_grad_batches)``
            is refused in manual optimization).
        gradsim_sync: under DDP, ``"global"`` (exact: one all-reduce of the per-task gradients,
            every rank gates on the global cosine), ``"sharded"`` (exact, less traffic: reduce-scatter
            the per-task gradients, all-reduce the per-layer Gramian, all-gather the combined
            gradient) or ``"local"`` (each rank gates on its own cosine; only the combined gradient
            is all-reduced). Under ``ModelParallelStrategy`` (FSDP2) the gate works on the gradient
            shards and is exact. See ``docs/scaling.md``.
        gradsim_sync_overlap: with ``"global"`` or ``"sharded"``, start each task's all-reduce or
            reduce-scatter while the next task's backward runs (the same numbers; see ``docs/scaling.md``).
        gradsim_sync_buffers: ``"none"`` or ``"broadcast"`` (copy rank 0's module buffers, e.g.
            BatchNorm running statistics, to every rank after each optimizer step, as DDP does in
            automatic optimisation); with neither this nor ``Trainer(sync_batchnorm=True)`` a model
            with BatchNorm warns once under several processes.

    The mixin only orchestrates: it hands the gate the step's gradient transforms
    (:mod:`lightning_gradsim.core.transforms`: accumulate, unscale, all-reduce; see
    :meth:`gradsim_transforms`) and leaves schedulers, clipping and the GradScaler to
    :mod:`lightning_gradsim.lightning.optimization`. After each batch ``gradsim_last_step_skipped`` says
    whether the optimizer step was skipped (``None`` on a micro-batch that only accumulated).

    >>> import lightning as L
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from lightning_gradsim import GradientGate
    >>> class Net(GradSimMixin, L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    ...         self.main_head, self.aux_head = nn.Linear(16, 2), nn.Linear(16, 2)
    ...         self.gradsim = GradientGate(rule="unweighted")
    ...     def shared_parameters(self):
    ...         return self.trunk.parameters()
    ...     def task_losses(self, batch, batch_idx):
    ...         x, y, y_aux = batch
    ...         h = self.trunk(x)
    ...         main, rotated = F.cross_entropy(self.main_head(h), y), F.cross_entropy(self.aux_head(h), y_aux)
    ...         return {"main": main, "rotated": rotated}
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
    ...     torch.randn(12, 8), torch.randint(0, 2, (12,)), torch.randint(0, 2, (12,))), batch_size=4)
    >>> trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False, accelerator="cpu")
    >>> trainer.fit(Net(), data)
    >>> trainer.global_step
    3
    """

    gradsim_clip_val: float | None = None
    gradsim_clip_algorithm: str = "norm"
    gradsim_on_nonfinite: str = "skip"
    gradsim_log_losses: bool = True
    gradsim_accumulate_grad_batches: int = 1
    gradsim_sync: str = "global"
    gradsim_sync_overlap: bool = False
    gradsim_sync_buffers: str = "none"
    #: Whether the last batch's optimizer step was skipped (non-finite); ``None`` before any step
    #: and on micro-batches that only accumulated.
    gradsim_last_step_skipped: bool | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        mixin_index = mro.index(GradSimMixin)
        if LightningModule in mro and mro.index(LightningModule) < mixin_index:
            raise TypeError(
                f"{cls.__name__}: put GradSimMixin before LightningModule in the bases, "
                f"e.g. `class {cls.__name__}(GradSimMixin, L.LightningModule)`."
            )
        own_configure = vars(cls).get("configure_optimizers")
        if own_configure is not None and not getattr(own_configure, "_gradsim_wrapped", False):
            cls.configure_optimizers = keep_scheduler_monitors(own_configure)  # type: ignore[attr-defined]
        for klass in mro[:mixin_index]:
            if "training_step" in vars(klass):
                raise TypeError(
                    f"{klass.__name__} defines training_step, but GradSimMixin provides it. Remove it and "
                    "return the per-task losses from task_losses(batch, batch_idx) instead."
                )

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError("GradSimMixin needs manual optimization; automatic_optimization cannot be True.")

    def configure_callbacks(self) -> list[Callback]:
        """Refuse, before the first step, what the mixin cannot do with this trainer and gate."""
        trainer = self._trainer_or_none()
        if trainer is not None:
            check_trainer(self, trainer)
            if parallel_mode(trainer) == "fsdp2":
                self._gradsim_gate().state.packed = True  # distributed checkpoints: before any is restored
        return [GradSimSetup(), EpochSchedulerStepper()]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        gate = self._gradsim_gate()
        self._gradsim_step_params = None
        if self._gradsim_mode() == "fsdp2":  # the sharded parameters, before a forward swaps them out
            self._gradsim_step_params = self.gradsim_parameters()
        losses = check_task_losses(
            self.task_losses(batch, batch_idx), self._gradsim_own("_gradsim_warned_no_grad", set)
        )
        optimizers = optimizer_list(self.optimizers())  # type: ignore[attr-defined]
        final = self._gradsim_is_step_batch(batch_idx)
        if final:
            for opt in optimizers:
                opt.zero_grad()
        scaler = active_scaler(self._trainer_or_none())
        stats = self._gradsim_run_gate(gate, losses, final, scaler)
        self.gradsim_last_step_skipped = None
        if stats is not None:
            self._gradsim_last_stats = stats
            warned = self._gradsim_own("_gradsim_warned_tasks", set)
            step = self.global_step  # type: ignore[attr-defined]
            finite = finite_step(losses, stats, warned, self.gradsim_on_nonfinite, step, overflow_ok=scaler is not None)
            self.gradsim_last_step_skipped = not finite
            plugin = self.trainer.precision_plugin if scaler is not None else None  # type: ignore[attr-defined]
            step_optimizers(optimizers, finite, self.gradsim_clip_val, self.gradsim_clip_algorithm, plugin)
            if finite:
                step_schedulers(self.trainer, scheduler_monitors(self), "step", batch_idx)  # type: ignore[attr-defined]
            if scaler is not None:
                update_scaler(scaler, found_inf=not finite)
            if check_sync_buffers(self.gradsim_sync_buffers) == "broadcast" and self._gradsim_world_size() > 1:
                sync_module_buffers(self)  # type: ignore[arg-type]
        total = sum(v.detach() for v in losses.values())
        if self.gradsim_log_losses:
            log = self.log  # type: ignore[attr-defined]
            for name, value in losses.items():
                log(f"train/loss/{name}", value.detach(), on_step=True, on_epoch=False)
            log("train/loss", total, on_step=True, on_epoch=False, prog_bar=True)
        return total  # type: ignore[return-value]

    # ------------------------------------------------------------------ the step's gradient transforms
    def _gradsim_run_gate(
        self, gate: GradientGate, losses: dict[str, Tensor], final: bool, scaler: Any
    ) -> GateStats | None:
        """Run ``gradsim_backward`` with this step's transforms; ``None`` on a micro-batch that only
        accumulated. Under a GradScaler the losses are scaled here and unscaled by a transform."""
        items: list[GradientTransform] = []
        if self.gradsim_accumulate_grad_batches > 1 or self._gradsim_accumulator().count:
            accumulate = self._gradsim_accumulator()
            accumulate.final = final
            items.append(accumulate)
        backward_losses = losses
        if scaler is not None:
            backward_losses = {name: scaler.scale(loss) for name, loss in losses.items()}
            items.append(Unscale(1.0 / float(scaler.get_scale())))
        mode = self._gradsim_mode()
        if mode != "single":
            check_buffers(self, self._gradsim_own("_gradsim_checked_buffers", set))  # type: ignore[arg-type]
        if self._gradsim_sharded():
            sharded_directions(self)  # a whole direction EMA from a checkpoint: this rank's shards
        sync = sync_transform(mode, self.gradsim_sync, overlap=self.gradsim_sync_overlap and not items)
        if sync is not None:
            items.append(sync)
        pipeline = Transforms(items)
        self._gradsim_step_transforms = pipeline
        self._gradsim_step_reference = self._gradsim_reference_loss(gate, scaler)
        try:
            stats = self.gradsim_backward(
                gate, backward_losses[MAIN_TASK], {name: v for name, v in backward_losses.items() if name != MAIN_TASK}
            )
        finally:
            self._gradsim_step_transforms = self._gradsim_step_params = self._gradsim_step_reference = None
        if pipeline and pipeline.calls == 0:
            raise RuntimeError(
                f"{type(self).__name__}.gradsim_backward() did not call gate.backward(..., "
                "transforms=self.gradsim_transforms()): with gradsim_accumulate_grad_batches > 1, DDP or 16-mixed "
                "precision the mixin needs the per-task gradients to pass through the gate with the step's transforms."
            )
        return stats

    def _gradsim_reference_loss(self, gate: GradientGate, scaler: Any) -> Tensor | None:
        """The main loss on the next reference batch, on steps that measure (scaled like the others)."""
        if type(self).reference_loss is GradSimMixin.reference_loss or not gate.state.will_measure(gate.every_n_steps):
            return None
        batch = self._gradsim_reference_batches().next(self.gradsim_reference_dataloader)
        loss = self.reference_loss(self.trainer.strategy.batch_to_device(batch))  # type: ignore[attr-defined]
        return scaler.scale(loss) if scaler is not None else loss

    def _gradsim_reference_batches(self) -> ReferenceBatches:
        batches: ReferenceBatches = self._gradsim_own("_gradsim_reference_walk", ReferenceBatches)
        return batches

    def _gradsim_accumulator(self) -> Accumulate:
        """The running accumulation window (kept between steps and in checkpoints)."""
        return self._gradsim_own("_gradsim_accumulate", Accumulate)

    def _gradsim_own(self, name: str, factory: Any) -> Any:
        """The mixin's own per-module state (it has no ``__init__``): the attribute ``name``, created once."""
        value = getattr(self, name, None)
        if value is None:
            value = factory()
            setattr(self, name, value)
        return value

    def _gradsim_is_step_batch(self, batch_idx: int) -> bool:
        """Whether this batch ends an accumulation window (or the epoch), so the optimizer steps."""
        total = getattr(self._trainer_or_none(), "num_training_batches", float("inf"))
        return ends_window(batch_idx, self.gradsim_accumulate_grad_batches, total)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep a half-accumulated window and (``"sharded"``) the whole direction EMA in the checkpoint."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        save_step_state(self, checkpoint, self._gradsim_accumulator(), self._gradsim_sharded())
        checkpoint["gradsim_reference_batches"] = self._gradsim_reference_batches().state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore a half-accumulated window; start a fresh gate (with a warning) when the checkpoint
        has no state for it (e.g. written by the same network trained without GradSimMixin)."""
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        load_step_state(self, checkpoint, self._gradsim_accumulator())
        self._gradsim_reference_batches().load_state_dict(checkpoint.get("gradsim_reference_batches", {}))

    # ------------------------------------------------------------------ helpers
    def _gradsim_world_size(self) -> int:
        trainer = self._trainer_or_none()
        return 1 if trainer is None else world_size_of(trainer)

    def _gradsim_mode(self) -> str:
        """``"single"``, ``"ddp"`` or ``"fsdp2"`` (:func:`~lightning_gradsim.lightning.validation.parallel_mode`)."""
        trainer = self._trainer_or_none()
        return "single" if trainer is None else parallel_mode(trainer)

    def _gradsim_sharded(self) -> bool:
        """Whether the direction EMA is kept in DDP shards (``gradsim_sync="sharded"`` on several processes)."""
        return self._gradsim_mode() == "ddp" and check_sync_mode(self.gradsim_sync) == "sharded"

    def _gradsim_gate(self) -> GradientGate:
        return gate_of(self)
