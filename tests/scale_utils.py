"""Shared pieces of the scaling tests (DDP, precision, accumulation, resume): a tiny gated model,
deterministic data split by rank, a resumable loader, and the DDP worker entry point."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

from lightning_gradsim import GradientGate, GradSimMixin
from lightning_gradsim.methods import make_gate

IN, HIDDEN, CLASSES = 6, 12, 3


def make_batches(num_batches: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``num_batches`` global batches of ``batch_size`` rows: ``(x, y_main, y_aux)``.

    The auxiliary labels agree with the main ones on some batches and not on others, so the
    gate's cosine changes sign along a run.
    """
    g = torch.Generator().manual_seed(seed)
    w_main = torch.randn(IN, CLASSES, generator=g)
    w_other = torch.randn(IN, CLASSES, generator=g)
    out = []
    for b in range(num_batches):
        x = torch.randn(batch_size, IN, generator=g)
        y = (x @ w_main).argmax(1)
        mix = 0.9 if b % 3 == 0 else 0.1
        y_aux = (x @ (mix * w_main + (1 - mix) * w_other)).argmax(1)
        out.append((x, y, y_aux))
    return out


def rank_slice(batches: list[tuple[torch.Tensor, ...]], rank: int, world: int) -> list[tuple[torch.Tensor, ...]]:
    """Rank ``rank``'s contiguous share of every global batch (so the ranks' batches together are it)."""
    out = []
    for batch in batches:
        n = batch[0].shape[0] // world
        out.append(tuple(t[rank * n : (rank + 1) * n] for t in batch))
    return out


def merge_pairs(batches: list[tuple[torch.Tensor, ...]], k: int) -> list[tuple[torch.Tensor, ...]]:
    """Concatenate each run of ``k`` consecutive batches (the last run may be shorter)."""
    return [tuple(torch.cat(ts) for ts in zip(*batches[i : i + k])) for i in range(0, len(batches), k)]


class BatchList:
    """An iterable of fixed batches with Lightning's ``state_dict``/``load_state_dict`` protocol, so a
    mid-epoch checkpoint resumes at the next batch."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.batches = batches
        self.served = 0
        self._start = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, len(self.batches)):
            self.served = i + 1
            yield self.batches[i]
        self.served = 0

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = state["served"]


class TinyNet(GradSimMixin, L.LightningModule):
    """A two-layer trunk with a main head and an auxiliary head, reading the same batch."""

    def __init__(
        self,
        rule: str = "unweighted",
        optimizer: str = "adam",
        gate: dict[str, Any] | None = None,
        seed: int = 0,
        accumulate: int = 1,
        sync: str = "global",
        scheduler: bool = False,
        inject_inf_at: tuple[int, ...] = (),
        clip: float | None = None,
        inject: dict[int, str] | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.main_head = nn.Linear(HIDDEN, CLASSES)
        self.aux_head = nn.Linear(HIDDEN, CLASSES)
        self.gradsim = make_gate(method, **(gate or {})) if method else GradientGate(rule=rule, **(gate or {}))
        self.opt_name = optimizer
        self.use_scheduler = scheduler
        self.gradsim_accumulate_grad_batches = accumulate
        self.gradsim_sync = sync
        self.gradsim_clip_val = clip
        self.inject_inf_at = set(inject_inf_at)
        #: batch index -> where the auxiliary task is poisoned: "trunk" (its gradient on the trunk output,
        #: what ``inject_inf_at`` does), "loss" (the loss times inf) or "head" (its head's weight gradient)
        self.inject = dict(inject or {})
        #: per batch: the mixin's ``gradsim_last_step_skipped``
        self.skip_log: list[bool | None] = []
        #: one entry per gate step: (cosine, gate_open, skipped)
        self.gate_log: list[tuple[list[float], list[bool], bool]] = []
        self.batches_seen = 0

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y, y_aux = batch
        h = self.trunk(x)
        h_aux, aux_weight = h, self.aux_head.weight
        site = "trunk" if self.batches_seen in self.inject_inf_at else self.inject.get(self.batches_seen)
        if site == "trunk":
            # An overflow in the auxiliary task's backward only (its loss stays finite).
            h_aux = h * 1.0
            h_aux.register_hook(lambda g: torch.full_like(g, float("inf")))
        elif site == "head":  # the auxiliary head's weight gradient only
            aux_weight = aux_weight * 1.0
            aux_weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        self.batches_seen += 1
        # through the module itself unless its weight is poisoned (FSDP2 shards the module's parameters)
        logits = F.linear(h_aux, aux_weight, self.aux_head.bias) if site == "head" else self.aux_head(h_aux)
        aux = F.cross_entropy(logits.float(), y_aux)
        return {
            "main": F.cross_entropy(self.main_head(h).float(), y),
            "aux": aux * float("inf") if site == "loss" else aux,
        }

    def on_train_start(self):
        self._logged_step = int(self.gradsim.step)  # after a checkpoint is restored

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.skip_log.append(self.gradsim_last_step_skipped)
        stats = self.gradsim.last_stats
        if stats is not None and int(self.gradsim.step) != self._logged_step:
            self._logged_step = int(self.gradsim.step)
            self.gate_log.append((stats.cosine.tolist(), stats.gate_open.tolist(), not bool(stats.finite.all())))

    def configure_optimizers(self):
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=0.02)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(**kwargs: Any) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def fit(model: TinyNet, batches, ckpt_path: str | None = None, **trainer_kwargs: Any) -> TinyNet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(**trainer_kwargs).fit(model, train_dataloaders=BatchList(list(batches)), ckpt_path=ckpt_path)
    return model


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class DroppedCalls(Callback):
    """For a reference run on the batches without the poisoned ones: before each batch, what the dropped
    batches before it did in the poisoned run: one gate call each, and (``backoff``) the GradScaler's backoff."""

    def __init__(self, dropped, num_batches: int, backoff: bool = False) -> None:
        self.kept = [i for i in range(num_batches) if i not in set(dropped)]
        self.num_batches = num_batches
        self.pending = sorted(dropped)
        self.backoff = backoff

    def _catch_up(self, trainer, pl_module, upto: int) -> None:
        while self.pending and self.pending[0] < upto:
            self.pending.pop(0)
            pl_module.gradsim.state.calls += 1
            if self.backoff:
                scaler = trainer.precision_plugin.scaler
                scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._catch_up(trainer, pl_module, self.kept[batch_idx])

    def on_train_end(self, trainer, pl_module):
        self._catch_up(trainer, pl_module, self.num_batches)


# ---------------------------------------------------------------------- DDP worker
def join_as_torchrun(rank: int, world: int, port: int) -> None:
    """Start one spawned rank as ``torchrun`` would: one torch thread, and the environment that names the
    rank, so that Lightning's DDP / ModelParallel strategies join the gloo group without launching."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        GROUP_RANK="0",
        RANK=str(rank),
        PL_DISABLE_FORK="1",
    )


def ddp_worker(rank: int, world: int, port: int, out_dir: str, scenarios: list[dict[str, Any]]) -> None:
    """Entry point of one DDP rank (``torch.multiprocessing.spawn``): like ``torchrun``, the
    environment names the rank, and Lightning's ``strategy="ddp"`` joins the gloo group. Runs
    every scenario and saves each rank's final weights and gate log to ``out_dir``."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    join_as_torchrun(rank, world, port)
    for sc in scenarios:
        model = TinyNet(**sc["model"])
        if sc.get("inject_rank", rank) != rank:
            model.inject_inf_at, model.inject = set(), {}
        batches = rank_slice(make_batches(sc["num_batches"], sc["batch_size"]), rank, world)
        kwargs = dict(sc.get("trainer", {}))
        callbacks: list[Callback] = []
        if sc.get("drop"):  # a reference run without these batches (what their skipped steps did, done)
            batches = [b for i, b in enumerate(batches) if i not in sc["drop"]]
            callbacks.append(DroppedCalls(sc["drop"], sc["num_batches"], backoff=bool(sc.get("scaler"))))
        if sc.get("checkpoint_every"):
            callbacks.append(
                ModelCheckpoint(
                    dirpath=os.path.join(out_dir, sc["name"]),
                    every_n_train_steps=sc["checkpoint_every"],
                    save_top_k=-1,
                    filename="{step}",
                )
            )
        plugins = []
        if sc.get("scaler"):
            from lightning.pytorch.plugins.precision import MixedPrecision

            plugins.append(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **sc["scaler"])))
        ckpt = sc.get("resume_from")
        sizes: list[int] = []
        real_all_reduce = torch.distributed.all_reduce

        def counting_all_reduce(tensor, *args, sizes=sizes, real_all_reduce=real_all_reduce, **kwargs):
            sizes.append(tensor.numel())
            return real_all_reduce(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counting_all_reduce
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = L.Trainer(
                accelerator="cpu",
                devices=world,
                strategy=DDPStrategy(process_group_backend="gloo"),
                logger=False,
                enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                callbacks=callbacks,
                plugins=plugins,
                enable_progress_bar=False,
                enable_model_summary=False,
                use_distributed_sampler=False,
                **{"max_epochs": 1, **kwargs},
            )
            t.fit(model, train_dataloaders=BatchList(batches), ckpt_path=os.path.join(out_dir, ckpt) if ckpt else None)
        torch.distributed.all_reduce = real_all_reduce
        result = {
            "all_reduce_sizes": sizes,
            "params": params(model),
            "gate_log": model.gate_log,
            "skip_log": model.skip_log,
            "optimizer": t.optimizers[0].state_dict()["state"],
            "gate": {k: v.clone() for k, v in model.gradsim.state_dict().items() if isinstance(v, torch.Tensor)},
        }
        if sc.get("scaler"):
            result["scale"] = t.precision_plugin.scaler.get_scale()
        torch.save(result, os.path.join(out_dir, f"{sc['name']}_rank{rank}.pt"))
