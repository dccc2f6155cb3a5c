"""The one registry of sync modes: how the processes of a run stay in step, and what each mode refuses.

A :class:`SyncMode` names the gradient transform the mode adds to every step (built by ``transform``),
the strategy it serves (``"ddp"``: the user picks it with ``GradSimMixin.gradsim_sync``; ``"fsdp2"``:
``ModelParallelStrategy``), whether it is exact (a run on ``N`` processes equals one process on the
concatenated batch: the sync-equivalence tester checks every exact mode against that) and the settings it
refuses, as ``(kind, message)`` pairs (``kind``: ``"misconfigured"`` or ``"unsupported"``), checked once
before training. A new sync mode is one module in :mod:`lightning_gradsim.parallel` and one entry here.

>>> SYNC_MODES["sharded"].refusals(SyncSettings(loss_weighting="GradNorm", needs_losses=True))[0][0]
'misconfigured'
>>> SYNC_MODES["sharded"].refusals(SyncSettings(loss_weighting="UncertaintyWeighting"))
[]
>>> SYNC_MODES["global"].refusals(SyncSettings()), SYNC_MODES["local"].exact
([], False)
>>> check_sync_mode("sharded")
'sharded'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ..core.transforms import GradientTransform
from .ddp_global import AllReduce
from .ddp_local import AllReduceCombined
from .ddp_sharded import ReduceScatter
from .fsdp2 import FSDPShards

__all__ = [
    "SyncSettings",
    "SyncMode",
    "SYNC_MODES",
    "DDP_SYNC_MODES",
    "SYNC_BUFFERS",
    "check_sync_mode",
    "check_sync_buffers",
]

Refusal = tuple[str, str]  # (kind, message): kind "misconfigured" or "unsupported"


class SyncSettings(NamedTuple):
    """What a sync mode's requirements look at (the module's and the gate's settings).

    Attributes:
        similarity: the gate's ``similarity`` (``"parameters"`` or ``"features"``).
        every_n_steps: the gate's ``every_n_steps``.
        loss_weighting: the class name of the gate's loss weighting, ``None`` without one.
        needs_losses: whether that loss weighting reads the task losses (GradNorm does).
        accumulate: the module's ``gradsim_accumulate_grad_batches``.
        grad_scaler: whether a GradScaler scales the losses (``precision="16-mixed"``).
        requested: the module's ``gradsim_sync``.
    """

    similarity: str = "parameters"
    every_n_steps: int = 1
    loss_weighting: str | None = None  # the loss weighting's class name, if any
    needs_losses: bool = False  # whether that loss weighting reads the task losses (GradNorm)
    accumulate: int = 1
    grad_scaler: bool = False
    requested: str = "global"  # the module's gradsim_sync


@dataclass(frozen=True)
class SyncMode:
    """One way to synchronise a step (see the module docstring).

    Attributes:
        name: the mode's name, the key in :data:`SYNC_MODES` (what ``gradsim_sync`` takes for a DDP mode).
        strategy: the strategy it serves: ``"ddp"`` or ``"fsdp2"``.
        transform: ``overlap -> GradientTransform``: builds the transform the mode adds to every step.
        exact: whether a run on ``N`` processes equals one process on the concatenated batch.
        needs_task_gradients: whether its transform acts on the per-task parameter gradients (then
            ``similarity="features"`` and ``every_n_steps > 1`` are refused).
        summary: one line saying what the mode sends.
        refuses: ``SyncSettings -> [(kind, message), ...]``: the settings the mode cannot run with,
            beyond the ``needs_task_gradients`` check :meth:`refusals` adds.
    """

    name: str
    strategy: str  # "ddp" or "fsdp2"
    transform: Callable[[bool], GradientTransform]  # overlap -> the step's transform
    exact: bool
    needs_task_gradients: bool
    summary: str
    refuses: Callable[[SyncSettings], list[Refusal]] = lambda s: []

    def refusals(self, settings: SyncSettings) -> list[Refusal]:
        """The settings this mode cannot run with, ``[]`` when it can (the first one is raised)."""
        found = list(self.refuses(settings))
        if self.needs_task_gradients and (settings.similarity != "parameters" or settings.every_n_steps != 1):
            found.append(_needs_task_gradients(self, settings))
        return found


def _needs_task_gradients(mode: SyncMode, s: SyncSettings) -> Refusal:
    if mode.strategy == "fsdp2":
        return (
            "misconfigured",
            "Under ModelParallelStrategy (FSDP2) the gate takes the per-task parameter gradients: use "
            f"similarity='parameters' and every_n_steps=1 (got {s.similarity!r}, {s.every_n_steps}).",
        )
    return (
        "misconfigured",
        f"The gate has similarity={s.similarity!r}, every_n_steps={s.every_n_steps}, which take no per-task "
        f"parameter gradients, but DDP with gradsim_sync = {mode.name!r} needs them. Use similarity='parameters' "
        "and every_n_steps=1 there (or gradsim_sync = 'local' under DDP).",
    )


def _sharded_refuses(s: SyncSettings) -> list[Refusal]:
    if s.loss_weighting is not None and s.needs_losses:
        return [
            (
                "misconfigured",
                f"gradsim_sync = 'sharded' does not carry the task losses {s.loss_weighting} needs: use "
                "gradsim_sync = 'global' with a loss weighting.",
            )
        ]
    return []


def _fsdp2_refuses(s: SyncSettings) -> list[Refusal]:
    found: list[Refusal] = []
    if s.requested == "local":
        found.append(
            (
                "misconfigured",
                "gradsim_sync = 'local' gates on each rank's own gradients, but under FSDP2 the gradients are "
                "already reduce-scattered shards: remove it (the gate is exact under FSDP2, gradsim_sync does not "
                "apply).",
            )
        )
    if s.accumulate > 1:
        found.append(
            (
                "unsupported",
                "gradsim_accumulate_grad_batches > 1 is not supported under ModelParallelStrategy (FSDP2) yet: a "
                "half-accumulated window of gradient shards would not survive a checkpoint. Use DDP, or a larger "
                "batch.",
            )
        )
    if s.grad_scaler:
        found.append(
            (
                "unsupported",
                "16-mixed precision (a GradScaler) is not supported with the gate under ModelParallelStrategy "
                "(FSDP2); use precision='bf16-mixed' or FSDP2's MixedPrecisionPolicy in fully_shard().",
            )
        )
    if s.loss_weighting is not None and s.similarity == "parameters" and s.every_n_steps == 1:
        found.append(
            (
                "unsupported",
                f"Loss weightings ({s.loss_weighting}) are not supported under ModelParallelStrategy (FSDP2) yet; "
                "use DDP.",
            )
        )
    return found


#: Every sync mode by name. ``gradsim_sync`` picks among those whose strategy is ``"ddp"``.
SYNC_MODES: dict[str, SyncMode] = {
    "global": SyncMode(
        "global",
        "ddp",
        lambda overlap: AllReduce(overlap=overlap),
        exact=True,
        needs_task_gradients=True,
        summary="exact: gate on the all-reduced per-task gradients",
    ),
    "sharded": SyncMode(
        "sharded",
        "ddp",
        lambda overlap: ReduceScatter(overlap=overlap),
        exact=True,
        needs_task_gradients=True,
        summary="exact, less traffic: reduce-scatter them, all-reduce the Gramian, all-gather the combined gradient",
        refuses=_sharded_refuses,
    ),
    "local": SyncMode(
        "local",
        "ddp",
        lambda overlap: AllReduceCombined(),
        exact=False,
        needs_task_gradients=False,
        summary="cheapest: gate on each rank's own gradients, all-reduce the combined one",
    ),
    "fsdp2": SyncMode(
        "fsdp2",
        "fsdp2",
        lambda overlap: FSDPShards(),
        exact=True,
        needs_task_gradients=True,
        summary="FSDP2 (ModelParallelStrategy): gate on the gradient shards, all-reduce the Gramian",
        refuses=_fsdp2_refuses,
    ),
}

#: Valid values of ``GradSimMixin.gradsim_sync``.
DDP_SYNC_MODES = tuple(name for name, mode in SYNC_MODES.items() if mode.strategy == "ddp")

#: Valid values of ``GradSimMixin.gradsim_sync_buffers``.
SYNC_BUFFERS = ("none", "broadcast")


def check_sync_mode(mode: str) -> str:
    """Return ``mode`` if it is a valid ``gradsim_sync``, else raise a ``ValueError`` naming the choices."""
    if mode not in DDP_SYNC_MODES:
        choices = "; ".join(f"{n!r} ({SYNC_MODES[n].summary})" for n in DDP_SYNC_MODES)
        raise ValueError(f"gradsim_sync must be one of: {choices}; got {mode!r}.")
    return mode


def check_sync_buffers(mode: str) -> str:
    """Return ``mode`` if it is a valid ``gradsim_sync_buffers``, else raise a ``ValueError``.

    >>> check_sync_buffers("broadcast")
    'broadcast'
    """
    if mode not in SYNC_BUFFERS:
        raise ValueError(
            f"gradsim_sync_buffers must be 'none' or 'broadcast' (copy rank 0's module buffers, e.g. BatchNorm "
            f"running statistics, to every rank after each optimizer step), got {mode!r}."
        )
    return mode
