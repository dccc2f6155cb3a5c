"""``GradSimMixin``: gradient-similarity training for a LightningModule, with no loop to write."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .distributed import AccumulateOnly, TaskGradientAccumulator, TaskGradientHook, all_reduce_mean, check_sync_mode
from .distributed import world_size as _world_size
from .gate import MAIN_TASK, GateStats, GradientGate

__all__ = ["GradSimMixin", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Raised when a task's loss or gradient is NaN/inf and ``gradsim_on_nonfinite == "raise"``."""


class GradSimMixin:
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
            every rank gates on the global cosine) or ``"local"`` (each rank gates on its own
            cosine; only the combined gradient is all-reduced). See ``docs/scaling.md``.

    Example::

        class Net(GradSimMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Linear(64, 100), nn.ReLU())
                self.main_head, self.aux_head = nn.Linear(100, 10), nn.Linear(100, 10)
                self.gradsim = GradientGate(rule="unweighted")

            def shared_parameters(self):
                return self.trunk.parameters()

            def task_losses(self, batch, batch_idx):
                x, y, x_aux, y_aux = batch
                return {"main": F.cross_entropy(self.main_head(self.trunk(x)), y),
                        "rotated": F.cross_entropy(self.aux_head(self.trunk(x_aux)), y_aux)}

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters())
    """

    gradsim_clip_val: float | None = None
    gradsim_clip_algorithm: str = "norm"
    gradsim_on_nonfinite: str = "skip"
    gradsim_log_losses: bool = True
    gradsim_accumulate_grad_batches: int = 1
    gradsim_sync: str = "global"

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
            cls.configure_optimizers = _keep_scheduler_monitors(own_configure)  # type: ignore[attr-defined]
        for klass in mro[:mixin_index]:
            if "training_step" in vars(klass):
                raise TypeError(
                    f"{klass.__name__} defines training_step, but GradSimMixin provides it. Remove it and "
                    "return the per-task losses from task_losses(batch, batch_idx) instead."
                )

    # ------------------------------------------------------------------ user hooks
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

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError("GradSimMixin needs manual optimization; automatic_optimization cannot be True.")

    def configure_callbacks(self) -> list[Callback]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
                raise MisconfigurationException(
                    f"GradSimMixin clips the combined gradient itself: remove "
                    f"`Trainer(gradient_clip_val={trainer.gradient_clip_val})` and set "
                    f"`self.gradsim_clip_val = {trainer.gradient_clip_val}` in your module instead."
                )
            if trainer.accumulate_grad_batches != 1:
                raise MisconfigurationException(
                    f"Lightning refuses `Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})` "
                    "in manual optimization; remove it and set "
                    f"`self.gradsim_accumulate_grad_batches = {trainer.accumulate_grad_batches}` in your module."
                )
        return []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        gate = self._gradsim_gate()
        losses = self._checked_losses(self.task_losses(batch, batch_idx))
        optimizers = self._gradsim_optimizers()
        final = self._gradsim_is_step_batch(batch_idx)
        if final:
            for opt in optimizers:
                opt.zero_grad()
        stats, hook, scaler = self._gradsim_run_gate(gate, losses, final)
        if stats is not None:
            self._gradsim_last_stats = stats
            nonfinite = bool(hook.nonfinite) if hook.nonfinite is not None else False
            if self._gradsim_world_size() > 1 and check_sync_mode(self.gradsim_sync) == "local":
                nonfinite = self._gradsim_all_reduce_grads(optimizers, nonfinite)
            finite = self._finite_step(losses, stats, nonfinite, overflow_ok=scaler is not None)
            if finite:
                self._clip_combined_gradient(optimizers)
                with _scaler_detached(self.trainer.precision_plugin if scaler is not None else None):  # type: ignore[attr-defined]
                    for opt in optimizers:
                        opt.step()
                self._step_schedulers("step", batch_idx)
            else:
                for opt in optimizers:
                    opt.zero_grad()
            if scaler is not None:
                _update_scaler(scaler, found_inf=not finite)
        total = sum(v.detach() for v in losses.values())
        if self.gradsim_log_losses:
            log = self.log  # type: ignore[attr-defined]
            for name, value in losses.items():
                log(f"train/loss/{name}", value.detach(), on_step=True, on_epoch=False)
            log("train/loss", total, on_step=True, on_epoch=False, prog_bar=True)
        return total

    def gradsim_backward(self, gate: GradientGate, main_loss: Tensor, aux_losses: Mapping[str, Tensor]) -> GateStats:
        """Run the gate and fill ``.grad``; override to customise how gradients are obtained."""
        shared = [p for p in self.shared_parameters() if p.requires_grad]
        if not shared:
            raise ValueError(
                f"{type(self).__name__}.shared_parameters() returned no trainable parameter: return the "
                "backbone's parameters, e.g. `return self.trunk.parameters()`."
            )
        shared_ids = {id(p) for p in shared}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in shared_ids]  # type: ignore[attr-defined]
        return gate.backward(main_loss, aux_losses, shared, other_params=others)

    # ------------------------------------------------------------------ scaling out
    def _gradsim_run_gate(
        self, gate: GradientGate, losses: dict[str, Tensor], final: bool
    ) -> tuple[GateStats | None, TaskGradientHook, Any]:
        """Run ``gradsim_backward`` with the step's gradient hook installed on the gate.

        Returns ``(stats, hook, scaler)``; ``stats`` is ``None`` on a micro-batch that only
        accumulated. Under a GradScaler (``16-mixed``) the losses are scaled here and the per-task
        gradients unscaled in the hook, before the gate sees them.
        """
        sync = check_sync_mode(self.gradsim_sync)
        scaler = self._gradsim_scaler()
        inv_scale = None
        backward_losses = losses
        if scaler is not None:
            backward_losses = {name: scaler.scale(loss) for name, loss in losses.items()}
            inv_scale = 1.0 / float(scaler.get_scale())
        loss_nonfinite = ~torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()]).all()
        accumulator: TaskGradientAccumulator = self.__dict__.setdefault(
            "_gradsim_accumulator", TaskGradientAccumulator()
        )
        hook = TaskGradientHook(
            accumulator,
            final=final,
            inv_scale=inv_scale,
            sync_global=sync == "global" and self._gradsim_world_size() > 1,
            loss_nonfinite=loss_nonfinite,
        )
        main_loss = backward_losses[MAIN_TASK]
        aux_losses = {name: v for name, v in backward_losses.items() if name != MAIN_TASK}
        if self.gradsim_accumulate_grad_batches == 1 and inv_scale is None and not hook.sync_global:
            # Nothing to do between the per-task backward and the gate: keep the gate's fast path.
            return self.gradsim_backward(gate, main_loss, aux_losses), hook, scaler
        gate.__dict__["_task_gradient_hook"] = hook
        try:
            stats: GateStats | None = self.gradsim_backward(gate, main_loss, aux_losses)
        except AccumulateOnly:
            stats = None
        finally:
            gate.__dict__.pop("_task_gradient_hook", None)
        if hook.calls == 0 and (not final or hook.sync_global or scaler is not None):
            raise RuntimeError(
                f"{type(self).__name__}.gradsim_backward() did not call gate.backward(): with "
                "gradsim_accumulate_grad_batches > 1, DDP or 16-mixed precision the mixin needs the per-task "
                "gradients to pass through gate.backward(...)."
            )
        return stats, hook, scaler

    def _gradsim_is_step_batch(self, batch_idx: int) -> bool:
        """Whether this batch ends an accumulation window (or the epoch), so the optimizer steps."""
        k = self.gradsim_accumulate_grad_batches
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"gradsim_accumulate_grad_batches must be an integer >= 1, got {k!r}.")
        if (batch_idx + 1) % k == 0:
            return True
        trainer = self._trainer_or_none()
        total = getattr(trainer, "num_training_batches", float("inf")) if trainer is not None else float("inf")
        return total != float("inf") and batch_idx + 1 >= total

    def _gradsim_world_size(self) -> int:
        trainer = self._trainer_or_none()
        if trainer is None:
            return 1
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel", "XLA")):
            raise MisconfigurationException(
                f"GradSimMixin supports single-device and DDP strategies (ddp, ddp_spawn, ddp_fork, multi-node "
                f"ddp), not {strategy}: sharded parameters have no whole per-task gradient to compare."
            )
        return _world_size() if trainer.world_size > 1 else 1

    def _gradsim_scaler(self) -> Any:
        trainer = self._trainer_or_none()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler

    def _gradsim_all_reduce_grads(self, optimizers: list[Any], nonfinite: bool) -> bool:
        """``gradsim_sync="local"``: average the combined ``.grad`` over the ranks (one all-reduce)."""
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.requires_grad]
        params = list({id(p): p for p in params}.values())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        averaged, bad = all_reduce_mean(grads, nonfinite=torch.tensor(nonfinite, device=grads[0].device))
        for p, g in zip(params, averaged):
            p.grad = g
        return bool(bad)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep a half-accumulated window (``gradsim_accumulate_grad_batches > 1``) in the checkpoint."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        accumulator = self.__dict__.get("_gradsim_accumulator")
        if accumulator is not None and accumulator.count > 0:
            checkpoint["gradsim_accumulator"] = accumulator.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        accumulator = TaskGradientAccumulator()
        if "gradsim_accumulator" in checkpoint:
            accumulator.load_state_dict(checkpoint["gradsim_accumulator"])
        self.__dict__["_gradsim_accumulator"] = accumulator

    # ------------------------------------------------------------------ helpers
    def _trainer_or_none(self) -> Trainer | None:
        try:
            return self.trainer  # type: ignore[attr-defined]
        except RuntimeError:
            return None

    def _gradsim_gate(self) -> GradientGate:
        gate = getattr(self, "gradsim", None)
        if not isinstance(gate, GradientGate):
            raise AttributeError(
                f"{type(self).__name__} has no GradientGate at self.gradsim"
                + ("" if gate is None else f" (found {type(gate).__name__})")
                + ': add `self.gradsim = GradientGate(rule="unweighted")` to __init__.'
            )
        return gate

    def _gradsim_optimizers(self) -> list[Any]:
        optimizers = self.optimizers()  # type: ignore[attr-defined]
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        return optimizers

    def _checked_losses(self, losses: Any) -> dict[str, Tensor]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"task_losses() must return a dict of losses by task name, got {type(losses).__name__}.")
        losses = dict(losses)
        if MAIN_TASK not in losses:
            raise KeyError(
                f"task_losses() returned tasks {sorted(losses)} but no {MAIN_TASK!r}: the main task's loss "
                f"must be under the key {MAIN_TASK!r}."
            )
        if len(losses) < 2:
            raise ValueError(
                "task_losses() returned only the main loss: add at least one auxiliary task, or train "
                "without GradSimMixin (plain automatic optimization)."
            )
        return losses

    def _finite_step(
        self, losses: Mapping[str, Tensor], stats: GateStats, nonfinite: bool = False, overflow_ok: bool = False
    ) -> bool:
        # One host sync per step: the decision to step the optimizer needs it. ``nonfinite``: the
        # gradient hook (or the local-sync all-reduce) saw a NaN/inf here or on another rank.
        loss_finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
        if not nonfinite and bool(loss_finite.all() & stats.finite.all()):  # one sync, not two
            return True
        if overflow_ok and bool(loss_finite.all()):
            return False  # a 16-mixed overflow: the GradScaler backs off, as in plain AMP training
        names = list(losses)
        grad_finite = torch.cat([stats.main_norm.reshape(1), stats.aux_norm.reshape(-1)]).isfinite()
        bad = [n for n, lf, gf in zip(names, loss_finite.tolist(), grad_finite.tolist()) if not (lf and gf)]
        bad = bad or names
        if self.gradsim_on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"Non-finite loss or gradient in task(s) {bad} at step {self.global_step}. "  # type: ignore[attr-defined]
                "Set gradsim_on_nonfinite='skip' to skip such steps instead."
            )
        warned: set[str] = self.__dict__.setdefault("_gradsim_warned_tasks", set())
        new = [n for n in bad if n not in warned]
        if new:
            warned.update(new)
            warnings.warn(
                f"Skipping a training step: non-finite loss or gradient in task(s) {new} "
                f"(step {self.global_step}; warned once per task, counted in gradsim/skipped_steps).",  # type: ignore[attr-defined]
                RuntimeWarning,
                stacklevel=2,
            )
        return False

    def _clip_combined_gradient(self, optimizers: list[Any]) -> None:
        if self.gradsim_clip_val is None or self.gradsim_clip_val <= 0:
            return
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if self.gradsim_clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, self.gradsim_clip_val)
        elif self.gradsim_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.gradsim_clip_val)
        else:
            raise ValueError(f"gradsim_clip_algorithm must be 'norm' or 'value', got {self.gradsim_clip_algorithm!r}.")

    def _step_schedulers(self, interval: str, batch_idx: int | None = None) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        self._ensure_epoch_scheduler_callback(trainer)
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            index = (batch_idx if interval == "step" else trainer.current_epoch) + 1
            if index % config.frequency != 0:
                continue
            if isinstance(config.scheduler, ReduceLROnPlateau):
                monitor, strict = self.__dict__.get("_gradsim_scheduler_monitors", {}).get(
                    id(config.scheduler), (None, True)
                )
                if monitor is None:
                    raise MisconfigurationException(
                        "A ReduceLROnPlateau scheduler needs the metric to watch: return "
                        '{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}} '
                        "from configure_optimizers()."
                    )
                value = trainer.callback_metrics.get(monitor)
                if value is None:
                    if strict:
                        raise MisconfigurationException(
                            f"ReduceLROnPlateau conditioned on metric {monitor} which is not available. "
                            f"Available metrics are: {list(trainer.callback_metrics)}."
                        )
                    continue
                config.scheduler.step(value)
            else:
                config.scheduler.step()

    def _ensure_epoch_scheduler_callback(self, trainer: Trainer) -> None:
        if not any(isinstance(cb, _EpochSchedulerStepper) for cb in trainer.callbacks):
            trainer.callbacks.append(_EpochSchedulerStepper())


def _keep_scheduler_monitors(configure: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``configure_optimizers`` to keep each scheduler's ``monitor``/``strict`` for the mixin.

    Lightning drops (and warns about) these keys in manual optimization; the mixin steps
    ``ReduceLROnPlateau`` itself and needs them.
    """

    @functools.wraps(configure)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = configure(self, *args, **kwargs)
        monitors: dict[int, tuple[str | None, bool]] = self.__dict__.setdefault("_gradsim_scheduler_monitors", {})

        def strip(entry: Any, default_monitor: str | None = None) -> Any:
            if isinstance(entry, Mapping) and "scheduler" in entry:
                entry = dict(entry)
                monitor = entry.pop("monitor", default_monitor)
                strict = entry.pop("strict", True)
                entry.pop("reduce_on_plateau", None)
                monitors[id(entry["scheduler"])] = (monitor, strict)
                return entry
            if isinstance(entry, ReduceLROnPlateau):
                monitors[id(entry)] = (default_monitor, True)
            return entry

        def visit(conf: Any) -> Any:
            if isinstance(conf, Mapping) and "optimizer" in conf:
                conf = dict(conf)
                monitor = conf.pop("monitor", None)
                if "lr_scheduler" in conf:
                    conf["lr_scheduler"] = strip(conf["lr_scheduler"], monitor)
                return conf
            if isinstance(conf, tuple) and len(conf) == 2 and all(isinstance(c, (list, tuple)) for c in conf):
                return list(conf[0]), [strip(s) for s in conf[1]]
            if isinstance(conf, (list, tuple)):
                return type(conf)(visit(c) for c in conf)
            return conf

        return visit(config)

    wrapper._gradsim_wrapped = True  # type: ignore[attr-defined]
    return wrapper


class _EpochSchedulerStepper(Callback):
    """Steps epoch-interval LR schedulers of a GradSimMixin module (Lightning skips them in manual mode)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(pl_module, GradSimMixin):
            pl_module._step_schedulers("epoch")


class _scaler_detached:
    """Step the optimizers through Lightning without its GradScaler: the mixin unscaled the
    per-task gradients itself and steps/updates the scaler once per step (never ``unscale_`` twice)."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self.scaler = None

    def __enter__(self) -> None:
        if self.plugin is not None:
            self.scaler, self.plugin.scaler = self.plugin.scaler, None

    def __exit__(self, *exc: Any) -> None:
        if self.plugin is not None:
            self.plugin.scaler = self.scaler


def _update_scaler(scaler: Any, found_inf: bool) -> None:
    """``scaler.update()`` with this step's overflow flag (grow after clean steps, back off on inf)."""
    scale = scaler._scale
    if scale is None:  # nothing was scaled yet
        return
    state = scaler._per_optimizer_states[0]
    state["found_inf_per_device"] = {scale.device: torch.full((), float(found_inf), device=scale.device)}
    scaler.update()
