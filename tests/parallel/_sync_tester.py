"""The sync-equivalence tester's pieces (tests/parallel/test_sync_equivalence.py), in the spirit of
torchmetrics' ``MetricTester``: every registered sync mode x every registered rule x every loss weighting
the mode accepts, run on 2 real processes and checked against one process.

* :func:`all_combos` enumerates the combinations from the registries at call time
  (:data:`~lightning_gradsim.parallel.registry.SYNC_MODES`, :func:`~lightning_gradsim.rules.list_rules`,
  :func:`~lightning_gradsim.loss_weighting.method_modules`), so a new sync mode, rule or weighting is tested
  without touching the tester.
* :class:`Replica` is one process's model, gate and SGD; :func:`reference` runs the single-process truth:
  an exact mode's on the concatenated batch, ``local``'s definition with one replica per rank, gradients
  averaged before each step.
* :func:`worker` is one spawned rank (gloo, started as torchrun would): it runs every combination with the
  mode's transform, the gate's real collectives, and saves what the tests compare.

Plain torch, no Lightning: the worker starts fast and the whole module stays small on 2 CPU cores.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradsim.core.tensor_ops import is_dtensor
from lightning_gradsim.loss_weighting import method_modules
from lightning_gradsim.methods import make_gate
from lightning_gradsim.parallel.ddp_sharded import ReduceScatter, gather_directions
from lightning_gradsim.parallel.fsdp2 import ShardSpec
from lightning_gradsim.parallel.registry import SYNC_MODES, SyncMode, SyncSettings
from lightning_gradsim.rules import get_rule, list_rules

from .._spawn import save_rank

IN, HIDDEN, FEATURES = 4, 8, 6
AUX = ("agrees", "conflicts")  # the auxiliary tasks: one pulls the trunk with the main task, one against it
STEPS, BATCH, LR, SEED = 4, 16, 0.05, 0
#: The gate's options where the method takes them (a loss weighting on the "sum" rule has no cosine gate).
GATE_OPTIONS = {"cosine_ema": 0.5, "main_grad_ema": 0.5, "seed": 3}
#: What each loss weighting's make_gate needs besides the gate options (none needed: {}).
WEIGHTING_OPTIONS: dict[str, dict[str, Any]] = {"uncertainty": {"aux_tasks": list(AUX)}}
#: Rules with options, tested as rules of their own: name -> (registered rule, its options).
RULE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"gradvac_per_tensor": ("gradvac", {"per_tensor": True})}
STAT_FIELDS = ("cosine", "smoothed_cosine", "weight", "gate_open", "main_norm", "aux_norm", "finite")


class Combo(NamedTuple):
    """One sync mode x rule x loss weighting (a module of :mod:`lightning_gradsim.loss_weighting`, or None)."""

    mode: str
    rule: str
    weighting: str | None

    @property
    def key(self) -> str:
        return f"{self.mode}-{self.rule}-{self.weighting or 'none'}"

    def __str__(self) -> str:
        return self.key


def rule_of(name: str) -> Any:
    """The rule object of a combination's rule name (a registered rule or one of :data:`RULE_VARIANTS`)."""
    rule, kwargs = RULE_VARIANTS.get(name, (name, {}))
    return get_rule(rule, **kwargs)


def build_gate(rule: str, weighting: str | None) -> nn.Module:
    """The gate of ``rule`` (with ``weighting``), built as users do, through :func:`make_gate`."""
    rule, rule_kwargs = RULE_VARIANTS.get(rule, (rule, {}))
    if weighting is None:
        return make_gate(rule, **GATE_OPTIONS, **rule_kwargs)
    options = dict(WEIGHTING_OPTIONS.get(weighting, {}), rule=get_rule(rule, **rule_kwargs) if rule_kwargs else rule)
    options.update(GATE_OPTIONS if rule != "sum" else {"seed": GATE_OPTIONS["seed"]})
    return make_gate(weighting, **options)


def settings_of(name: str, mode: SyncMode, gate: Any) -> SyncSettings:
    """What the mode's requirements look at for this gate (as the mixin's ``sync_settings`` reads them)."""
    lw = gate.loss_weighting
    return SyncSettings(
        similarity=gate.similarity,
        every_n_steps=gate.every_n_steps,
        loss_weighting=None if lw is None else type(lw).__name__,
        needs_losses=lw is not None and bool(lw.needs_losses),
        requested=name if mode.strategy == "ddp" else SyncSettings().requested,
    )


def all_combos(modes: dict[str, SyncMode] | None = None) -> list[tuple[Combo, list[tuple[str, str]]]]:
    """Every (combination, the mode's refusals of it), read from the registries now.

    >>> combos = all_combos()
    >>> len(combos) == len(SYNC_MODES) * (len(list_rules()) + len(RULE_VARIANTS)) * (1 + len(method_modules()))
    True
    """
    modes = SYNC_MODES if modes is None else modes
    out = []
    for name, mode in modes.items():
        for rule in [*list_rules(), *RULE_VARIANTS]:
            for weighting in [None, *sorted(method_modules())]:
                gate = build_gate(rule, weighting)
                out.append((Combo(name, rule, weighting), mode.refusals(settings_of(name, mode, gate))))
    return out


def accepted_combos() -> list[Combo]:
    """The combinations every mode accepts (``refusals == []``): those the tester runs and checks."""
    return [combo for combo, refusals in all_combos() if not refusals]


# ---------------------------------------------------------------------- data and model
def make_batches(seed: int = SEED) -> list[tuple[Tensor, Tensor]]:
    """``STEPS`` global batches ``(x, targets)``, ``targets[:, 0]`` the main task's, then one per auxiliary
    task: ``agrees`` is the main target plus noise, ``conflicts`` its negation plus noise. With the
    auxiliary heads starting as copies of the main head, their trunk gradients start near the main one's
    and near its opposite: the gate opens on one and closes on the other, with cosines far from 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, 1, generator=g)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, IN, generator=g)
        y = x @ w + 0.3 * torch.randn(BATCH, 1, generator=g)
        noise = 0.3 * torch.randn(BATCH, len(AUX), generator=g)
        out.append((x, torch.cat([y, y + noise[:, :1], -y + noise[:, 1:]], dim=1)))
    return out


def rank_half(batch: tuple[Tensor, ...], rank: int, world: int) -> tuple[Tensor, ...]:
    """Rank ``rank``'s contiguous share of a global batch (the shares together are the batch)."""
    n = batch[0].shape[0] // world
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


class Net(nn.Module):
    """A trunk (Linear-ReLU-Linear), a main head and one head per auxiliary task (copies of the main one)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same initial weights in every process, the caller's RNG untouched
            torch.manual_seed(SEED)
            self.trunk = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES))
            self.main_head = nn.Linear(FEATURES, 1)
        with torch.no_grad():
            self.main_head.weight.mul_(0.2)
            self.main_head.bias.zero_()
        self.aux_heads = nn.ModuleList(copy.deepcopy(self.main_head) for _ in AUX)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.trunk(x)
        return self.main_head(h), [head(h) for head in self.aux_heads]

    def heads(self) -> list[Tensor]:
        return [*self.main_head.parameters(), *self.aux_heads.parameters()]

    def shard(self, mesh: Any) -> None:
        """FSDP2: ``fully_shard`` the trunk's layers, every head and the root over ``mesh``."""
        from torch.distributed.fsdp import fully_shard

        for module in [*(m for m in self.trunk if isinstance(m, nn.Linear)), self.main_head, *self.aux_heads, self]:
            fully_shard(module, mesh=mesh)


class Replica:
    """One process's copy of the run: the model and the gate of ``combo``, trained by SGD."""

    def __init__(self, combo: Combo, mesh: Any = None, record: bool = False) -> None:
        self.net, self.gate = Net(), build_gate(combo.rule, combo.weighting)
        if mesh is not None:
            self.net.shard(mesh)
        self.log: list[dict[str, Tensor]] = []
        self.transform: Any = None
        #: ``record``: what the rule saw at each step (the Gramian, the smoothed cosine, the threshold)
        self.seen: list[tuple[Tensor, Tensor, float]] = []
        if record:
            rule, weights = self.gate.rule, self.gate.rule.weights

            def recording(inp: Any) -> Tensor:
                self.seen.append((inp.gramian.detach().clone(), inp.cosine.detach().clone(), float(inp.threshold)))
                return weights(inp)

            rule.weights = recording

    def parameters(self) -> list[Tensor]:
        return [*self.net.parameters(), *self.gate.parameters()]

    def backward(self, batch: tuple[Tensor, ...], transform: Callable[[], Any] | None = None) -> None:
        """One gate step's backward on ``batch`` (with a fresh ``transform()``, as the mixin builds per step)."""
        x, targets = batch
        main, aux = self.net(x)
        losses = [(out - targets[:, i : i + 1]).pow(2).mean() for i, out in enumerate([main, *aux])]
        self.transform = transform() if transform is not None else None
        stats = self.gate.backward(
            losses[0],
            dict(zip(AUX, losses[1:])),
            self.net.trunk.parameters(),
            other_params=self.net.heads(),
            transforms=None if self.transform is None else [self.transform],
        )
        assert stats is not None and bool(stats.finite), "every step of the tester is finite"
        self.log.append({f: getattr(stats, f).detach().clone() for f in STAT_FIELDS})

    def step(self) -> None:
        """Plain SGD, what ``torch.optim.SGD(lr=LR)`` does (``p -= lr * p.grad``), then the gradients cleared.
        (Written out: importing ``torch.optim`` imports ``torch._dynamo``, seconds per process.)"""
        with torch.no_grad():
            for p in self.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-LR)
                p.grad = None

    def result(self) -> dict[str, Any]:
        """Parameters (whole), the gate's tensors (the direction EMA whole) and the step log.

        Under ``"sharded"`` and FSDP2 the direction EMA lives in shards: gathering it is a collective,
        every rank calls this."""
        params = {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in self.net.named_parameters()}
        params.update({f"gate.{n}": p.detach().clone() for n, p in self.gate.named_parameters()})
        state = {k: v.detach().clone() for k, v in self.gate.state_dict().items() if isinstance(v, Tensor)}
        keys = [f"state.{name}" for name in self.gate.state.direction_buffer_names()]
        shared = list(self.net.trunk.parameters())
        if keys and isinstance(self.transform, ReduceScatter):  # this rank's range of the concatenation
            gather_directions(state, keys, shared)
        elif keys and is_dtensor(shared[0]):  # FSDP2: this rank's local shard of each tensor
            for key, p in zip(keys, shared):
                state[key] = ShardSpec.of(p).wrap(state[key]).full_tensor()
        return {"params": params, "gate": state, "log": self.log, "seen": self.seen}


def average_grads(replicas: Sequence[Replica]) -> None:
    """``local``'s update: every replica's gradient becomes the average of theirs (a missing one counts
    as zeros, as :class:`~lightning_gradsim.parallel.ddp_local.AllReduceCombined` does)."""
    for group in zip(*(r.parameters() for r in replicas)):
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group]
        mean = torch.stack(grads).sum(0) / len(grads)
        for p in group:
            p.grad = mean.clone()


def reference(combo: Combo, world: int) -> list[dict[str, Any]]:
    """The single-process truth for each of ``world`` ranks.

    An exact mode: one replica on the concatenated batch (every rank must end as it). ``local`` (its
    definition in :mod:`lightning_gradsim.parallel.ddp_local`): one replica per rank, each gating on its own
    half with its own state; the applied update is the average of the per-rank combined gradients."""
    batches = make_batches()
    if SYNC_MODES[combo.mode].exact:
        single = Replica(combo, record=True)
        for batch in batches:
            single.backward(batch)
            single.step()
        return [single.result()] * world
    replicas = [Replica(combo, record=True) for _ in range(world)]
    for batch in batches:
        for rank, replica in enumerate(replicas):
            replica.backward(rank_half(batch, rank, world))
        average_grads(replicas)
        for replica in replicas:
            replica.step()
    return [r.result() for r in replicas]


@contextmanager
def gradnorm_margins() -> Iterator[list[float]]:
    """Record, at each GradNorm update, ``min_i |G_i - target_i| / mean(G)``: how far its ``sign`` is from
    a tie (the test keeps it away from 0, so no decision depends on float rounding)."""
    from lightning_gradsim.loss_weighting import gradnorm

    real, margins = gradnorm.gradnorm_update, []

    def recording(weights, norms, raw_norms, losses, initial_losses, first, alpha, lr):
        new, initial = real(weights, norms, raw_norms, losses, initial_losses, first, alpha, lr)
        ratio = losses / torch.where(initial != 0, initial, torch.ones_like(initial))
        target = norms.mean() * (ratio / ratio.mean()).clamp(min=0).pow(alpha)
        margins.append(float(((norms - target).abs() / norms.mean()).min()))
        return new, initial

    gradnorm.gradnorm_update = recording
    try:
        yield margins
    finally:
        gradnorm.gradnorm_update = real


# ---------------------------------------------------------------------- the spawned rank
def run_combo(combo: Combo, rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Rank ``rank``'s run of ``combo``: its half of every batch, the mode's transform in every step."""
    mode = SYNC_MODES[combo.mode]
    if mode.strategy not in ("ddp", "fsdp2"):
        raise NotImplementedError(f"The tester does not know how to set up strategy {mode.strategy!r}.")
    replica = Replica(combo, mesh=mesh() if mode.strategy == "fsdp2" else None)
    for batch in make_batches():
        replica.backward(rank_half(batch, rank, world), transform=lambda: mode.transform(False))
        replica.step()
    return replica.result()


def worker(rank: int, world: int, port: int, out_dir: str, combos: list[Combo]) -> None:
    """One rank (``torch.multiprocessing.spawn``), started as torchrun would (gloo); runs ``combos`` in order
    and saves ``{key: result or {"error": ...}}`` to ``out_dir/rank<rank>.pt``. A combination that raises
    is recorded, not fatal (the refused ones are expected to); a collective left waiting by the other rank
    times out after 2 minutes instead of hanging the test."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    meshes: list[Any] = []

    def mesh() -> Any:
        if not meshes:
            from torch.distributed.device_mesh import init_device_mesh

            meshes.append(init_device_mesh("cpu", (world,)))
        return meshes[0]

    results: dict[str, Any] = {}
    try:
        for combo in combos:
            try:
                results[combo.key] = run_combo(combo, rank, world, mesh)
            except Exception as err:  # recorded for the test to report
                results[combo.key] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        save_rank(out_dir, rank, results)
        dist.destroy_process_group()
