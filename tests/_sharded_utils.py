"""Pieces of the sharded-sync, FSDP2 and buffer tests (tests/parallel/test_sharded.py): models, a CPU stand-in for
SyncBatchNorm, and the 2-process worker (Lightning's own DDPStrategy / ModelParallelStrategy on gloo)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from lightning_gradsim.core.tensor_ops import is_dtensor
from lightning_gradsim.parallel.fsdp2 import FSDPShards

from .scale_utils import HIDDEN, IN, BatchList, TinyNet, join_as_torchrun, make_batches, rank_slice


class CpuSyncBatchNorm1d(nn.BatchNorm1d):
    """SyncBatchNorm's arithmetic on the CPU (torch's SyncBatchNorm and DDP refuse CPU modules): batch
    statistics summed over the ranks with a differentiable all-reduce, so every per-task backward runs a
    collective. (Not an nn.SyncBatchNorm, so the mixin warns about it as about any BatchNorm.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))]))
        count = stats[-1]
        mean = stats[:c] / count
        var = stats[c : 2 * c] / count - mean * mean
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * count / (count - 1))
            self.num_batches_tracked.add_(1)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class BNTinyNet(TinyNet):
    """TinyNet with a BatchNorm: on the input (``bn="input"``, statistics independent of the weights) or,
    as the stand-in SyncBatchNorm (``"sync"``) or a plain one (``"hidden"``), after the first layer."""

    def __init__(self, bn: str = "input", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        layers = list(self.trunk)
        if bn == "input":
            layers.insert(0, nn.BatchNorm1d(IN))
        else:
            layers.insert(1, CpuSyncBatchNorm1d(HIDDEN) if bn == "sync" else nn.BatchNorm1d(HIDDEN))
        self.trunk = nn.Sequential(*layers)


class ShardedTinyNet(TinyNet):
    """TinyNet sharded with FSDP2 in ``configure_model`` (as ``ModelParallelStrategy`` wants)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.trunk:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.main_head, mesh=mesh)
        fully_shard(self.aux_head, mesh=mesh)
        fully_shard(self, mesh=mesh)


MODELS = {"tiny": TinyNet, "bn": BNTinyNet, "fsdp": ShardedTinyNet}
COLLECTIVES = ("all_reduce", "reduce_scatter_single", "all_gather_single", "broadcast")


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (FSDP2 shards gathered: a collective, every rank calls it)."""
    return {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}


def sharded_worker(rank: int, world: int, port: int, out_dir: str, scenarios: list[dict[str, Any]]) -> None:
    """One rank (``torch.multiprocessing.spawn``), started as torchrun would; runs every scenario with
    Lightning's DDPStrategy or ModelParallelStrategy (gloo) and saves what the tests check."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    join_as_torchrun(rank, world, port)
    real = {name: getattr(dist, name) for name in COLLECTIVES}
    real_task_gradients = FSDPShards.task_gradients
    for sc in scenarios:
        model = MODELS[sc.get("model_class", "tiny")](**sc["model"])
        for key, value in sc.get("settings", {}).items():
            setattr(model, key, value)
        if sc.get("inject_rank", rank) != rank:
            model.inject_inf_at = set()
        batches = rank_slice(make_batches(sc["num_batches"], sc["batch_size"]), rank, world)
        callbacks = []
        if sc.get("checkpoint_every"):
            callbacks.append(
                ModelCheckpoint(
                    dirpath=os.path.join(out_dir, sc["name"]), every_n_train_steps=sc["checkpoint_every"],
                    save_top_k=-1, filename="{step}",
                )
            )  # fmt: skip
        sizes: list[tuple[str, int]] = []
        held: list[int] = []

        def counting(name: str, sizes: list[tuple[str, int]] = sizes):
            def call(*args, **kwargs):
                tensor = args[0] if args else kwargs.get("tensor", kwargs.get("output"))  # FSDP2 passes keywords
                sizes.append((name, tensor.numel()))
                return real[name](*args, **kwargs)

            return call

        def recording(self, grads, held: list[int] = held):
            status = real_task_gradients(self, grads)
            held.append(sum(g.numel() for row in grads.rows for g in row))  # the per-task shards this rank holds
            return status

        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        FSDPShards.task_gradients = recording
        if sc.get("strategy") == "fsdp":
            strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        else:
            strategy = DDPStrategy(process_group_backend="gloo")
        ckpt = sc.get("resume_from")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = L.Trainer(
                accelerator="cpu", devices=world, strategy=strategy, logger=False,
                enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_progress_bar=False,
                enable_model_summary=False, use_distributed_sampler=False, **{"max_epochs": 1, **sc.get("trainer", {})},
            )  # fmt: skip
            trainer.fit(model, BatchList(batches), ckpt_path=os.path.join(out_dir, ckpt) if ckpt else None)
        for name in COLLECTIVES:
            setattr(dist, name, real[name])
        FSDPShards.task_gradients = real_task_gradients
        state = model.gradsim.state
        packed, state.packed = state.packed, False  # plain tensors (the direction EMA: this rank's shards)
        gate_state = {k: v.clone() for k, v in state.state_dict().items() if isinstance(v, torch.Tensor)}
        state.packed = packed
        for i, spec in enumerate(state.direction_specs or []):  # FSDP2: the whole direction EMA
            gate_state[f"whole_main_grad_ema_{i}"] = spec.wrap(gate_state[f"main_grad_ema_{i}"]).full_tensor()
        result = {
            "params": full_params(model),
            "gate_log": model.gate_log,
            "gate": gate_state,
            "collectives": sizes,
            "held": held,
            "local_numel": sum((p.to_local() if is_dtensor(p) else p).numel() for p in model.trunk.parameters()),
            "warnings": [str(w.message) for w in caught],
            "buffers": {n: b.clone() for n, b in model.trunk.named_buffers()},
        }
        torch.save(result, os.path.join(out_dir, f"{sc['name']}_rank{rank}.pt"))
