"""FSDP2 (``fully_shard``; Lightning's ``ModelParallelStrategy``): the gate on each rank's gradient shards.

Under FSDP2 every parameter is a DTensor sharded over the data-parallel ranks, and after a
``backward`` its ``.grad`` is this rank's shard of the gradient averaged over the ranks (FSDP2
reduce-scatters it). So the gate takes one ``loss.backward(retain_graph=True)`` per task and keeps
each task's shard (``K S / N`` gradient elements per rank; :func:`backward_gradients`), and
:class:`FSDPShards` does the rest::

    task_gradients   the DTensor shards -> their local tensors; one all-reduce of a non-finite flag
    gramian          the per-layer Gramian of the local shards, all-reduced (sum): L x V x V floats,
                     the Gramian of the whole gradients, so every rank decides the same weights
    (apply)          the weights meet the local shards (and the shards of the projection direction EMA)
    combined         the combined local shards become the DTensor .grad the optimizer steps on

No gradient is ever gathered whole. The projection direction EMA is kept as local shards; in a
distributed checkpoint it is saved as DTensors (each rank writes its shard), see
:func:`prepare_gate`.

>>> is_dtensor(torch.ones(2))
False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.task_gradients import TaskGradients
from ..core.tensor_ops import _dtensor_class, is_dtensor
from ..core.transforms import READY, GradientTransform, Status

if TYPE_CHECKING:
    from ..core.gate import GradientGate

__all__ = ["FSDPShards", "ShardSpec", "prepare_gate"]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


class ShardSpec(NamedTuple):
    """How a parameter is sharded: what turns a local shard back into a DTensor like it."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, param: Tensor) -> ShardSpec:
        return cls(param.device_mesh, tuple(param.placements), param.shape, param.stride())  # type: ignore[attr-defined]

    def wrap(self, local: Tensor) -> Tensor:
        cls = _dtensor_class()
        assert cls is not None
        return cls.from_local(  # type: ignore[attr-defined]
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )


class FSDPShards(GradientTransform):
    """FSDP2: gate on this rank's shards of the per-task gradients (see the module docstring).

    Every parameter the gate handles (shared and heads) must be a DTensor sharded over a 1-D device
    mesh (``fully_shard(module, mesh=...)`` on the trunk's blocks, the heads and the root module).
    """

    handles_dtensor_shards = True

    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None
        self._targets: list[tuple[Tensor, Tensor]] = []  # (DTensor parameter, local holder)

    def task_gradients(self, grads: TaskGradients) -> Status:
        assert grads.params is not None and grads.other_params is not None
        params, others = list(grads.params), list(grads.other_params)
        self.group = _check_sharded(params + others)
        with torch.no_grad():
            holders = [p.to_local().detach() for p in params]  # type: ignore[attr-defined]
            other_holders = [p.to_local().detach() for p in others]  # type: ignore[attr-defined]
        rows = grads.to_rows().rows
        assert rows is not None
        # Zeros where a task reaches nothing: every rank has the same L layers in its Gramian.
        grads.rows = [[torch.zeros_like(h) if g is None else _local(g) for g, h in zip(row, holders)] for row in rows]
        grads.stacked = None
        grads.others = [None if g is None else _local(g) for g in grads.others]
        for p, h in zip(params + others, holders + other_holders):
            h.grad = None if p.grad is None else _local(p.grad)  # an existing .grad is added to in place
        grads.params, grads.other_params = holders, other_holders
        grads._present = None
        self._targets = list(zip(params + others, holders + other_holders))
        # This rank's losses and heads' shards: whether any rank saw a NaN/inf (the trunk's shards show in
        # the reduced Gramian).
        bad = torch.zeros((), dtype=torch.bool) if grads.finite is None else ~grads.finite
        norms = grads.others_norms()
        if norms is not None:
            bad = bad.to(norms.device) | ~torch.isfinite(norms).all()
        flag = bad.to(torch.float32).reshape(1)
        dist.all_reduce(flag, group=self.group)
        grads.finite = flag[0] == 0
        return READY

    def gramian(self, gram: Tensor) -> Tensor:
        gram = gram.contiguous()
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=self.group)
        return gram

    def combined(self, params: Sequence[Tensor], others: Sequence[Tensor], finite: Tensor) -> Tensor:
        for p, h in self._targets:
            if p.grad is None and h.grad is not None:
                p.grad = ShardSpec.of(p).wrap(h.grad)
        return finite

    def __repr__(self) -> str:
        return "FSDPShards()"


def _check_sharded(params: Sequence[Tensor]) -> dist.ProcessGroup:
    """The process group of the 1-D mesh every parameter is sharded over, or a clear error."""
    plain = [tuple(p.shape) for p in params if not is_dtensor(p)]
    if plain:
        raise ValueError(
            f"Under FSDP2 every trained parameter must be sharded, but {len(plain)} are plain tensors (shapes "
            f"{plain[:3]}...): call fully_shard() on each block the tasks call (trunk layers, heads) and then on the "
            "root module in configure_model()."
        )
    meshes = {id(p.device_mesh) for p in params}  # type: ignore[attr-defined]
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1 or len(meshes) > 1 and any(p.device_mesh != mesh for p in params):  # type: ignore[attr-defined]
        raise NotImplementedError(
            "The gate supports FSDP2 over one 1-D data-parallel mesh (fully_shard(..., "
            "mesh=self.device_mesh['data_parallel'])); tensor parallelism and HSDP (2-D meshes) are not supported."
        )
    if any(not pl.is_shard() for p in params for pl in p.placements):  # type: ignore[attr-defined]
        raise NotImplementedError(
            "The gate needs parameters sharded (Shard placements) by fully_shard, not replicated."
        )
    return mesh.get_group()


def prepare_gate(gate: GradientGate, shared: Sequence[Tensor]) -> None:
    """Ready a gate for distributed checkpoints (DCP) of FSDP2 shards: its state is saved packed (shapes
    known only after the first step cannot meet a checkpoint's), and the projection direction EMA is
    shaped as this rank's shards of ``shared`` now and saved as DTensors (each rank writes its shard).

    Call it before a checkpoint is restored (the mixin does, at ``on_fit_start``).
    """
    gate.state.packed = True
    if gate.rule.uses_main_direction and gate.main_grad_ema > 0:
        gate.state.direction_specs = [ShardSpec.of(p) for p in shared]
        with torch.no_grad():
            gate.state.ensure_directions([p.to_local() for p in shared])  # type: ignore[attr-defined]
