"""What ``GradSimMixin`` refuses or warns about, and how it decides that a step is skipped.

Everything here runs before the first gradient is written (the trainer and gate options, in
``configure_callbacks``; the task losses, at every step) or right after the gate (one host sync
per step to decide whether the optimizer steps).

>>> import torch
>>> check_task_losses({"main": torch.tensor(1.0, requires_grad=True), "rot": 0.5}, set())
Traceback (most recent call last):
...
TypeError: task_losses()['rot'] is a float, not a tensor: return the loss computed from the model (a 0-d ...
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from ..core.gate import MAIN_TASK, GateStats, GradientGate
from ..core.loss_weighting import LossWeighting
from ..parallel.collectives import world_size
from ..parallel.registry import SYNC_MODES, SyncMode, SyncSettings, check_sync_buffers, check_sync_mode
from .optimization import active_scaler

__all__ = [
    "NonFiniteLossError",
    "check_task_losses",
    "check_trainer",
    "check_buffers",
    "finite_step",
    "parallel_mode",
    "world_size_of",
    "gate_of",
    "ends_window",
]


class NonFiniteLossError(RuntimeError):
    """Raised when a task's loss or gradient is NaN/inf and ``gradsim_on_nonfinite == "raise"``."""


def check_trainer(module: Any, trainer: Trainer) -> None:
    """Trainer flags the mixin replaces, and options the gate cannot combine with this trainer (the sync
    mode's refusals, from :data:`~lightning_gradsim.parallel.registry.SYNC_MODES`)."""
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
    mode = parallel_mode(trainer)
    sync = check_sync_mode(module.gradsim_sync)
    check_sync_buffers(getattr(module, "gradsim_sync_buffers", "none"))
    k = module.gradsim_accumulate_grad_batches
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"gradsim_accumulate_grad_batches must be an integer >= 1, got {k!r}.")
    gate = getattr(module, "gradsim", None)
    settings = sync_settings(module, trainer, sync, k)
    sync_mode = active_sync_mode(mode, sync)
    if sync_mode is not None:
        for kind, message in sync_mode.refusals(settings):
            raise (NotImplementedError if kind == "unsupported" else MisconfigurationException)(message)
    if not isinstance(gate, GradientGate) or (gate.similarity == "parameters" and gate.every_n_steps == 1):
        return
    needs = []
    if k > 1:
        needs.append(f"gradsim_accumulate_grad_batches = {k}")
    if settings.grad_scaler:
        needs.append("16-mixed precision (a GradScaler)")
    if needs:
        raise MisconfigurationException(
            f"The gate has similarity={gate.similarity!r}, every_n_steps={gate.every_n_steps}, which take no "
            f"per-task parameter gradients, but {', '.join(needs)} needs them. Use similarity='parameters' and "
            "every_n_steps=1 there (or gradsim_sync = 'local' under DDP)."
        )


def sync_settings(module: Any, trainer: Trainer, sync: str, accumulate: int) -> SyncSettings:
    """What the sync modes' requirements look at, read from the module, its gate and the trainer."""
    gate = getattr(module, "gradsim", None)
    if not isinstance(gate, GradientGate):
        return SyncSettings(accumulate=accumulate, grad_scaler=active_scaler(trainer) is not None, requested=sync)
    lw = gate.loss_weighting
    return SyncSettings(
        similarity=gate.similarity,
        every_n_steps=gate.every_n_steps,
        loss_weighting=None if lw is None else type(lw).__name__,
        needs_losses=lw is not None and bool(lw.needs_losses),
        accumulate=accumulate,
        grad_scaler=active_scaler(trainer) is not None,
        requested=sync,
    )


def active_sync_mode(mode: str, sync: str) -> SyncMode | None:
    """The registry's sync mode for a ``parallel_mode`` (``"single"``: none) and the module's ``gradsim_sync``."""
    if mode == "single":
        return None
    return SYNC_MODES["fsdp2" if mode == "fsdp2" else sync]


def check_fsdp_trainer(module: Any, trainer: Trainer, sync: str, accumulate: int) -> None:
    """What the mixin supports under ``ModelParallelStrategy`` (FSDP2): the registry's ``"fsdp2"`` refusals."""
    for kind, message in SYNC_MODES["fsdp2"].refusals(sync_settings(module, trainer, sync, accumulate)):
        raise (NotImplementedError if kind == "unsupported" else MisconfigurationException)(message)


def parallel_mode(trainer: Trainer) -> str:
    """``"single"``, ``"ddp"`` (several DDP processes) or ``"fsdp2"`` (``ModelParallelStrategy``, any
    world size); a clear error for the strategies the mixin refuses."""
    strategy = type(trainer.strategy).__name__
    if "ModelParallel" in strategy:
        return "fsdp2"
    if "FSDP" in strategy:
        raise MisconfigurationException(
            f"GradSimMixin supports FSDP2 through ModelParallelStrategy, not {strategy} (FSDP1, whose flat "
            "parameters hide the per-task gradient shards): use ModelParallelStrategy and call fully_shard() in "
            "configure_model() (docs/scaling.md)."
        )
    if any(name in strategy for name in ("DeepSpeed", "XLA")):
        raise MisconfigurationException(
            f"GradSimMixin supports single-device, DDP (ddp, ddp_spawn, ddp_fork, multi-node ddp) and FSDP2 "
            f"(ModelParallelStrategy) strategies, not {strategy}: its sharded optimizer states and gradient "
            "partitions hide the per-task gradients the gate compares."
        )
    return "ddp" if trainer.world_size > 1 else "single"


def world_size_of(trainer: Trainer) -> int:
    """The number of processes that hold a part of each batch (1 without DDP/FSDP2); a clear error for
    the strategies the mixin refuses."""
    mode = parallel_mode(trainer)
    return world_size() if mode != "single" and trainer.world_size > 1 else 1


def check_buffers(module: nn.Module, warned: set[str]) -> None:
    """Warn once (checked once, recorded in ``warned``) when a BatchNorm layer's running statistics will
    differ across the ranks: manual optimisation broadcasts no buffer, and the layer is not a ``SyncBatchNorm``."""
    if "checked" in warned:
        return
    warned.add("checked")
    if getattr(module, "gradsim_sync_buffers", "none") != "none":
        return
    names = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, nn.SyncBatchNorm)
        and m.track_running_stats
    ]
    if names:
        warnings.warn(
            f"{len(names)} BatchNorm layer(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) keep running "
            "statistics that drift apart across the processes: manual optimisation broadcasts no buffer. Set "
            "Trainer(sync_batchnorm=True) (SyncBatchNorm, GPU) or `gradsim_sync_buffers = 'broadcast'` in the module "
            "(rank 0's statistics, as DDP does).",
            UserWarning,
            stacklevel=3,
        )


def check_task_losses(losses: Any, warned: set[str]) -> dict[str, Tensor]:
    """``task_losses()``'s result as ``{name: loss}``, or a clear error; warns (once per task, recorded
    in ``warned``) about an auxiliary loss that does not require grad."""
    if not isinstance(losses, Mapping):
        raise TypeError(f"task_losses() must return a dict of losses by task name, got {type(losses).__name__}.")
    if len({str(k) for k in losses}) != len(losses):
        raise ValueError(
            f"task_losses() returned task keys {list(losses)} that collide as names ({[str(k) for k in losses]}): "
            "give every task a distinct string key."
        )
    losses = {str(k): v for k, v in losses.items()}
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
    for name, value in losses.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"task_losses()[{name!r}] is a {type(value).__name__}, not a tensor: return the loss computed "
                "from the model (a 0-d torch.Tensor), not a Python number."
            )
    for name, value in losses.items():
        if name != MAIN_TASK and not value.requires_grad and name not in warned:
            warned.add(name)
            warnings.warn(
                f"task_losses()[{name!r}] does not require grad, so the task trains nothing (computed under "
                "torch.no_grad() or detached?). Warned once per task.",
                UserWarning,
                stacklevel=3,
            )
    return losses


def finite_step(
    losses: Mapping[str, Tensor],
    stats: GateStats,
    warned: set[str],
    on_nonfinite: str = "skip",
    global_step: int = 0,
    nonfinite: bool = False,
    overflow_ok: bool = False,
) -> bool:
    """Whether the optimizer steps: one host sync (``stats.finite`` has the losses, the per-task and
    head gradients and, under DDP, every rank's; ``nonfinite``: the local-sync all-reduce saw a
    NaN/inf). A skipped step warns once per task (recorded in ``warned``), or raises with
    ``on_nonfinite="raise"``."""
    loss_finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
    if not nonfinite and bool(loss_finite.all() & stats.finite.all()):  # one sync, not two
        return True
    if overflow_ok and bool(loss_finite.all()):
        return False  # a 16-mixed overflow: the GradScaler backs off, as in plain AMP training
    names = list(losses)
    grad_finite = torch.cat([stats.main_norm.reshape(1), stats.aux_norm.reshape(-1)]).isfinite()
    bad = [n for n, lf, gf in zip(names, loss_finite.tolist(), grad_finite.tolist()) if not (lf and gf)]
    bad = bad or names
    if on_nonfinite == "raise":
        raise NonFiniteLossError(
            f"Non-finite loss or gradient in task(s) {bad} at step {global_step}. "
            "Set gradsim_on_nonfinite='skip' to skip such steps instead."
        )
    new = [n for n in bad if n not in warned]
    if new:
        warned.update(new)
        warnings.warn(
            f"Skipping a training step: non-finite loss or gradient in task(s) {new} "
            f"(step {global_step}; warned once per task, counted in gradsim/skipped_steps).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def gate_of(module: Any) -> GradientGate:
    """The module's ``self.gradsim`` gate, or a clear error that says how to add one."""
    gate = getattr(module, "gradsim", None)
    if isinstance(gate, LossWeighting):
        raise AttributeError(
            f"self.gradsim is a {type(gate).__name__} (a loss weighting); compose it with a gate: "
            f'`self.gradsim = GradientGate(rule="sum", loss_weighting={type(gate).__name__}(...))` '
            "or make_gate(...)."
        )
    if not isinstance(gate, GradientGate):
        raise AttributeError(
            f"{type(module).__name__} has no GradientGate at self.gradsim"
            + ("" if gate is None else f" (found {type(gate).__name__})")
            + ': add `self.gradsim = GradientGate(rule="unweighted")` to __init__.'
        )
    return gate


def ends_window(batch_idx: int, accumulate: int, num_batches: float = float("inf")) -> bool:
    """Whether batch ``batch_idx`` ends an accumulation window of ``accumulate`` batches (or the epoch of
    ``num_batches``), so that the optimizer steps.

    >>> [ends_window(i, 2, 5) for i in range(5)]
    [False, True, False, True, True]
    """
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"gradsim_accumulate_grad_batches must be an integer >= 1, got {accumulate!r}.")
    if (batch_idx + 1) % accumulate == 0:
        return True
    return num_batches != float("inf") and batch_idx + 1 >= num_batches
