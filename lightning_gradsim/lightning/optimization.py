"""The optimisation side of a ``GradSimMixin`` step, outside the mixin: schedulers, clipping, the GradScaler.

In manual optimisation Lightning leaves these to the module; :class:`~lightning_gradsim.GradSimMixin`
calls them in order after the gate wrote ``.grad``: clip the combined gradient, step the optimizers
(without Lightning's scaler: the per-task gradients were unscaled already), update the scaler with
the step's overflow flag, step the LR schedulers as their config asks.

>>> import torch
>>> p = torch.nn.Parameter(torch.ones(2))
>>> p.grad = torch.tensor([3.0, 4.0])
>>> opt = torch.optim.SGD([p], lr=0.1)
>>> clip_gradients([opt], 1.0, "norm")
>>> p.grad
tensor([0.6000, 0.8000])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = [
    "clip_gradients",
    "step_schedulers",
    "keep_scheduler_monitors",
    "EpochSchedulerStepper",
    "active_scaler",
    "scaler_detached",
    "update_scaler",
    "step_optimizers",
    "optimizer_list",
    "scheduler_monitors",
    "optimizer_parameters",
]


def optimizer_list(optimizers: Any) -> list[Any]:
    """``LightningModule.optimizers()`` as a list (it returns a bare optimizer when there is one)."""
    return optimizers if isinstance(optimizers, list) else [optimizers]


def optimizer_parameters(optimizers: list[Any]) -> list[Tensor]:
    """The distinct parameters of ``optimizers`` that require grad, in order."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.requires_grad]
    return list({id(p): p for p in params}.values())


def clip_gradients(optimizers: list[Any], clip_val: float | None, algorithm: str = "norm") -> None:
    """Clip the combined gradient of the optimizers' parameters to ``clip_val`` (``"norm"`` or ``"value"``)."""
    if clip_val is None or clip_val <= 0:
        return
    if algorithm not in ("norm", "value"):
        raise ValueError(f"gradsim_clip_algorithm must be 'norm' or 'value', got {algorithm!r}.")
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)


def step_schedulers(
    trainer: Trainer,
    monitors: Mapping[int, tuple[str | None, bool]],
    interval: str,
    batch_idx: int | None = None,
) -> None:
    """Step the trainer's LR schedulers of ``interval`` (``"step"``/``"epoch"``) as their config asks
    (frequency; ``ReduceLROnPlateau`` with its monitored metric, ``monitors`` as
    :func:`keep_scheduler_monitors` kept them)."""
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval:
            continue
        index = (batch_idx if interval == "step" else trainer.current_epoch) + 1  # type: ignore[operator]
        if index % config.frequency != 0:
            continue
        if isinstance(config.scheduler, ReduceLROnPlateau):
            monitor, strict = monitors.get(id(config.scheduler), (None, True))
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


class EpochSchedulerStepper(Callback):
    """Steps the epoch-interval LR schedulers (Lightning skips them in manual optimization); declared
    up front by ``GradSimMixin.configure_callbacks``."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step_schedulers(trainer, scheduler_monitors(pl_module), "epoch")


def scheduler_monitors(module: Any) -> dict[int, tuple[str | None, bool]]:
    """What :func:`keep_scheduler_monitors` kept for ``module``'s schedulers (``{}`` if nothing)."""
    monitors: dict[int, tuple[str | None, bool]] = module.__dict__.get("_gradsim_scheduler_monitors", {})
    return monitors


def step_optimizers(
    optimizers: list[Any],
    finite: bool,
    clip_val: float | None,
    clip_algorithm: str,
    precision_plugin: Any,
) -> None:
    """Clip the combined gradient and step the optimizers (through Lightning, without its GradScaler:
    ``precision_plugin`` is the plugin whose scaler the mixin drives, else ``None``), or, on a skipped
    step, clear ``.grad`` so that nothing of it reaches the next one."""
    if not finite:
        for opt in optimizers:
            opt.zero_grad()
        return
    clip_gradients(optimizers, clip_val, clip_algorithm)
    with scaler_detached(precision_plugin):
        for opt in optimizers:
            opt.step()


def keep_scheduler_monitors(configure: Callable[..., Any]) -> Callable[..., Any]:
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


def active_scaler(trainer: Trainer | None) -> Any:
    """The trainer's enabled GradScaler (``16-mixed``), or ``None``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


class scaler_detached:
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


def update_scaler(scaler: Any, found_inf: bool) -> None:
    """``scaler.update()`` with this step's overflow flag (grow after clean steps, back off on inf)."""
    scale = scaler._scale
    if scale is None:  # nothing was scaled yet
        return
    state = scaler._per_optimizer_states[0]
    state["found_inf_per_device"] = {scale.device: torch.full((), float(found_inf), device=scale.device)}
    scaler.update()
