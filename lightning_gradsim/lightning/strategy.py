"""How :class:`~lightning_gradsim.GradSimMixin` keeps the processes of a run in step.

* :func:`sync_transform`: the gradient transform of a step for the trainer's parallelism (see
  ``docs/scaling.md``): none on one process; under DDP ``gradsim_sync`` picks
  :class:`~lightning_gradsim.parallel.ddp_global.AllReduce` (``"global"``),
  :class:`~lightning_gradsim.parallel.ddp_sharded.ReduceScatter` (``"sharded"``) or
  :class:`~lightning_gradsim.parallel.ddp_local.AllReduceCombined` (``"local"``); under FSDP2
  (``ModelParallelStrategy``) :class:`~lightning_gradsim.parallel.fsdp2.FSDPShards`.
* :class:`GradSimSetup`: readies the gate for distributed checkpoints under FSDP2 before Lightning
  restores one (``on_fit_start``).
* :func:`sync_module_buffers`: ``gradsim_sync_buffers = "broadcast"``.
* :func:`whole_directions` / :func:`sharded_directions`: under ``"sharded"`` the projection direction
  EMA lives in shards; checkpoints keep it whole.

>>> sync_transform("single", "global")
>>> sync_transform("ddp", "sharded", overlap=True)
ReduceScatter(overlap=True)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from ..core.gate import GradientGate
from ..core.transforms import GradientTransform
from ..parallel.collectives import broadcast_buffers, gather_floats
from ..parallel.ddp_sharded import gather_directions, shard_directions
from ..parallel.fsdp2 import prepare_gate
from ..parallel.registry import SYNC_MODES, check_sync_mode

__all__ = [
    "check_even_batches",
    "sync_transform",
    "GradSimSetup",
    "sync_module_buffers",
    "whole_directions",
    "sharded_directions",
]


def sync_transform(mode: str, sync: str, overlap: bool = False) -> GradientTransform | None:
    """The transform that synchronises a step: ``mode`` is ``"single"``, ``"ddp"`` or ``"fsdp2"``
    (:func:`~lightning_gradsim.lightning.validation.parallel_mode`), ``sync`` the module's ``gradsim_sync``;
    ``overlap``: start each task's all-reduce (global) or reduce-scatter (sharded) during the per-task
    backward. The registry (:data:`~lightning_gradsim.parallel.registry.SYNC_MODES`) builds it."""
    if mode == "single":
        return None
    name = "fsdp2" if mode == "fsdp2" else check_sync_mode(sync)
    return SYNC_MODES[name].transform(overlap)


class GradSimSetup(Callback):
    """Added by :meth:`GradSimMixin.configure_callbacks`: under ``ModelParallelStrategy`` (FSDP2), ready the
    gate's state for distributed checkpoints once the model is sharded and before a checkpoint is
    restored (Lightning restores after ``on_fit_start`` there)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            check_even_batches(gather_floats(float(trainer.num_training_batches)))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gate = getattr(pl_module, "gradsim", None)
        if isinstance(gate, GradientGate) and type(trainer.strategy).__name__.startswith("ModelParallel"):
            shared = [p for p in pl_module.shared_parameters() if p.requires_grad]  # type: ignore[operator]
            prepare_gate(gate, shared)


def sync_module_buffers(module: nn.Module) -> None:
    """Copy rank 0's module buffers (BatchNorm running statistics...) to every rank; the gates' own state
    is left alone (identical across ranks under exact syncs, each rank's own under ``"local"``)."""
    skip = {id(b) for m in module.modules() if isinstance(m, GradientGate) for b in m.buffers()}
    broadcast_buffers([b for b in module.buffers() if id(b) not in skip])


def _direction_keys(module: nn.Module, state_dict: dict[str, Any]) -> list[str]:
    """The keys of the mixin's gate's direction EMA in ``state_dict`` (``<gate>.state.main_grad_ema_<i>``)."""
    for name, m in module.named_modules():
        if m is getattr(module, "gradsim", None) and name:
            keys: list[str] = []
            prefix = f"{name}.state.main_grad_ema_"
            while prefix + str(len(keys)) in state_dict:
                keys.append(prefix + str(len(keys)))
            return keys
    return []


def whole_directions(module: Any, state_dict: dict[str, Any]) -> None:
    """In a checkpoint being saved under ``gradsim_sync="sharded"``: this rank's shards of the direction EMA
    become the whole tensors (one all-gather; every rank saves)."""
    keys = _direction_keys(module, state_dict)
    if keys:
        gather_directions(state_dict, keys, _shared(module))


def sharded_directions(module: Any) -> None:
    """Under ``gradsim_sync="sharded"``, before a step: a whole direction EMA (loaded from a checkpoint)
    becomes this rank's shards. (Not on load: DDP then still copies rank 0's buffers to every rank.)"""
    state = module.gradsim.state
    names = state.direction_buffer_names()
    if names:
        buffers = {name: getattr(state, name) for name in names}
        shard_directions(buffers, names, _shared(module))
        for name, value in buffers.items():
            setattr(state, name, value)


def _shared(module: Any) -> list[Tensor]:
    return [p for p in module.shared_parameters() if p.requires_grad]


def check_even_batches(counts: list[float]) -> None:
    """Refuse, before the first step, ranks with different numbers of batches per epoch: the gate's
    collectives run once per step on every rank, so a rank that runs out of batches first leaves the others
    waiting in an all-reduce (gloo: "Connection closed by peer"; NCCL: a hang).

    >>> check_even_batches([56.0, 56.0])
    >>> check_even_batches([56.0, 45.0])
    Traceback (most recent call last):
    ...
    RuntimeError: The processes have different numbers of training batches per epoch (rank 0: 56, rank 1: 45)...
    """
    if len(set(counts)) <= 1:
        return
    listed = ", ".join(f"rank {r}: {c:g}" for r, c in enumerate(counts))
    raise RuntimeError(
        f"The processes have different numbers of training batches per epoch ({listed}), but every step of the "
        "gate communicates between all of them, so the run would stop at the shortest one with a broken "
        "connection or hang. Give every process the same number of batches: keep Lightning's distributed "
        "sampler (Trainer(use_distributed_sampler=True), the default), or split the data evenly (drop_last=True, "
        "or equal shards), or set limit_train_batches to the smallest count."
    )
