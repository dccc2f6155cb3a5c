"""Beyond "global" DDP: the sharded DDP sync, FSDP2 (Lightning's ModelParallelStrategy), the local sync's
remote NaN, and BatchNorm buffers under manual optimisation; real 2-process gloo runs against one process
on the concatenated batches.

All 2-process scenarios run in ONE pair of spawned processes (module fixture), started like torchrun and
trained by Lightning Trainers (DDPStrategy / ModelParallelStrategy with distributed checkpoints).
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_gradsim import GradientGate
from lightning_gradsim.core.gradients import backward_gradients, per_task_gradients
from lightning_gradsim.lightning.validation import check_buffers, parallel_mode
from lightning_gradsim.parallel.ddp_sharded import ShardLayout

from .._sharded_utils import BNTinyNet, sharded_worker
from ..scale_utils import IN, TinyNet, fit, make_batches, params, rank_slice

WORLD, NUM_BATCHES, BATCH = 2, 10, 8
PROJ = {"rule": "projection", "gate": {"main_grad_ema": 0.5, "cosine_ema": 0.5}, "scheduler": True}
FSDP = {"model_class": "fsdp", "strategy": "fsdp"}
SCENARIOS = [
    {"name": "sharded", "model": {"rule": "unweighted", "gate": {"cosine_ema": 0.5}, "sync": "sharded"},
     "settings": {"gradsim_sync_overlap": True}},
    # The full runs checkpoint mid-epoch at step 4 (2 epochs of 10 batches); the resumed ones start from it.
    {"name": "sharded_full", "model": {**PROJ, "sync": "sharded"}, "checkpoint_every": 4, "trainer": {"max_epochs": 2}},
    {"name": "sharded_resumed", "model": {**PROJ, "sync": "sharded"}, "trainer": {"max_epochs": 2},
     "resume_from": "sharded_full/step=4.ckpt"},
    {"name": "local_nan", "model": {"rule": "unweighted", "sync": "local", "inject_inf_at": (2,)}, "inject_rank": 1},
    {"name": "bn_none", "model_class": "bn", "model": {"rule": "unweighted"}},
    {"name": "bn_broadcast", "model_class": "bn", "model": {"rule": "unweighted"},
     "settings": {"gradsim_sync_buffers": "broadcast"}},
    {"name": "bn_sync", "model_class": "bn", "model": {"rule": "unweighted", "bn": "sync", "optimizer": "sgd"}},
    {"name": "fsdp", **FSDP, "model": {"rule": "unweighted", "gate": {"cosine_ema": 0.5}}},
    {"name": "fsdp_full", **FSDP, "model": PROJ, "checkpoint_every": 4, "trainer": {"max_epochs": 2}},
    {"name": "fsdp_resumed", **FSDP, "model": PROJ, "trainer": {"max_epochs": 2},
     "resume_from": "fsdp_full/step=4.ckpt"},
]  # fmt: skip
for sc in SCENARIOS:
    sc.setdefault("num_batches", NUM_BATCHES)
    sc.setdefault("batch_size", BATCH)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(sharded_worker, args=(WORLD, port, str(out), SCENARIOS), nprocs=WORLD, join=True)
    load = torch.load
    return {
        sc["name"]: [load(os.path.join(out, f"{sc['name']}_rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        for sc in SCENARIOS
    } | {"dir": out}


def _single(name: str, model=None, **overrides):
    sc = next(s for s in SCENARIOS if s["name"] == name)
    kwargs = {k: v for k, v in {**sc["model"], **overrides}.items() if k != "sync"}
    return fit(model or TinyNet(**kwargs), make_batches(sc["num_batches"], sc["batch_size"]), **sc.get("trainer", {}))


def _same_params(a, b, atol=1e-5):
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=f"parameter {name}")


def _same_log(a, b):
    assert len(a) == len(b)
    for (ca, oa, sa), (cb, ob, sb) in zip(a, b):
        assert oa == ob and sa == sb
        torch.testing.assert_close(torch.tensor(ca), torch.tensor(cb), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- gradsim_sync="sharded" (DDP)
@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sharded", "sharded_full", "fsdp", "fsdp_full"])
def test_two_processes_equal_one_on_the_concatenated_batch(runs, name):
    """DDP with gradsim_sync="sharded" (with and without overlap) and FSDP2 under ModelParallelStrategy:
    the same weights and gate decisions as one process; the projection direction EMA kept in shards."""
    ref = _single(name)
    for rank in runs[name]:
        _same_params(rank["params"], params(ref))
        _same_log(rank["gate_log"], ref.gate_log)
    if name in ("sharded_full", "fsdp_full"):
        directions = ref.gradsim.state.directions()
        shapes = [p.shape for p in ref.trunk.parameters()]
        for r, rank in enumerate(runs[name]):
            if name == "fsdp_full":  # each rank's DTensor shard, gathered in the worker
                local = [rank["gate"][f"whole_main_grad_ema_{i}"] for i in range(len(shapes))]
                torch.testing.assert_close(local, directions, atol=1e-6, rtol=1e-5)
            else:  # rank r holds its range of the concatenated direction
                layout = ShardLayout([s.numel() for s in shapes], WORLD, r)
                mine = [d.reshape(-1)[lo:hi] for d, (lo, hi, _) in zip(directions, layout.pieces)]
                theirs = [rank["gate"][f"main_grad_ema_{i}"] for i in range(len(shapes))]
                torch.testing.assert_close(theirs, mine, atol=1e-6, rtol=1e-5)
                assert sum(t.numel() for t in theirs) == layout.chunk


@pytest.mark.ddp
@pytest.mark.slow
def test_sharded_sync_moves_k_shards_a_gramian_and_one_gathered_gradient(runs):
    model = TinyNet()
    shared = sum(p.numel() for p in model.trunk.parameters())
    heads = sum(p.numel() for h in (model.main_head, model.aux_head) for p in h.parameters())
    k, layers = 2, 4
    sizes = runs["sharded"][0]["collectives"]
    assert sizes.count(("reduce_scatter_single", shared // WORLD)) == k * NUM_BATCHES  # output: this rank's chunk
    assert sizes.count(("all_gather_single", shared)) == NUM_BATCHES
    assert sizes.count(("all_reduce", layers * k * k)) == NUM_BATCHES  # the per-layer Gramian
    assert sizes.count(("all_reduce", heads + 1)) == NUM_BATCHES  # the heads and the non-finite flag
    assert not any(n == "all_reduce" and s >= shared for n, s in sizes)  # no per-task gradient all-reduced


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sharded", "fsdp"])
def test_resume_from_sharded_checkpoints_is_exact(runs, name):
    full, resumed = runs[f"{name}_full"], runs[f"{name}_resumed"]
    if name == "sharded":  # the checkpoint keeps the direction EMA whole (loads under any sync and world size)
        state = torch.load(os.path.join(runs["dir"], "sharded_full", "step=4.ckpt"), weights_only=False)["state_dict"]
        assert [state[f"gradsim.state.main_grad_ema_{i}"].shape for i in range(4)] == [
            p.shape for p in TinyNet().trunk.parameters()
        ]
    else:  # a distributed checkpoint: one file per rank
        assert (
            len([f for f in os.listdir(os.path.join(runs["dir"], "fsdp_full", "step=4.ckpt")) if f.endswith(".distcp")])
            == 2
        )
    for r in range(WORLD):
        _same_params(resumed[r]["params"], full[r]["params"], atol=1e-6)
        for key, value in full[r]["gate"].items():
            torch.testing.assert_close(resumed[r]["gate"][key], value, atol=1e-6, rtol=1e-6, msg=key)
        assert resumed[r]["gate_log"] == full[r]["gate_log"][4:]


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp_keeps_k_gradient_shards_per_rank(runs):
    shared = sum(p.numel() for p in TinyNet().trunk.parameters())
    for rank in runs["fsdp"]:
        assert rank["local_numel"] == shared // WORLD
        assert set(rank["held"]) == {2 * shared // WORLD}  # K shards of S / N, never a whole gradient


# ---------------------------------------------------------------------- local sync, BatchNorm buffers
@pytest.mark.ddp
@pytest.mark.slow
def test_local_sync_counts_another_ranks_nan_as_skipped(runs):
    for rank in runs["local_nan"]:
        assert [s for _, _, s in rank["gate_log"]] == [False, False, True] + [False] * (NUM_BATCHES - 3)
        assert int(rank["gate"]["skipped_steps"]) == 1 and int(rank["gate"]["measured_steps"]) == NUM_BATCHES - 1
    _same_params(runs["local_nan"][0]["params"], runs["local_nan"][1]["params"], atol=0)


def _input_bn_stats(rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm1d's running statistics (momentum 0.1) over the input batches rank ``rank`` sees (``None``: all)."""
    batches = make_batches(NUM_BATCHES, BATCH)
    if rank is not None:
        batches = rank_slice(batches, rank, WORLD)
    mean, var = torch.zeros(IN), torch.ones(IN)
    for x, _, _ in batches:
        mean, var = 0.9 * mean + 0.1 * x.mean(0), 0.9 * var + 0.1 * x.var(0)
    return mean, var


@pytest.mark.ddp
@pytest.mark.slow
def test_batchnorm_statistics_drift_apart_without_sync_and_a_warning_says_so(runs):
    ranks = runs["bn_none"]
    for r, rank in enumerate(ranks):
        mean, var = _input_bn_stats(r)  # each rank's own half batches
        torch.testing.assert_close(rank["buffers"]["0.running_mean"], mean)
        torch.testing.assert_close(rank["buffers"]["0.running_var"], var)
    assert not torch.allclose(ranks[0]["buffers"]["0.running_mean"], ranks[1]["buffers"]["0.running_mean"])
    assert any("BatchNorm layer(s) (trunk.0)" in w for w in ranks[0]["warnings"])
    assert not any("BatchNorm layer" in w for w in runs["bn_broadcast"][0]["warnings"])


@pytest.mark.ddp
@pytest.mark.slow
def test_buffer_broadcast_gives_every_rank_rank_0s_statistics(runs):
    mean, var = _input_bn_stats(0)
    for rank in runs["bn_broadcast"]:
        torch.testing.assert_close(rank["buffers"]["0.running_mean"], mean)
        torch.testing.assert_close(rank["buffers"]["0.running_var"], var)
        assert int(rank["buffers"]["0.num_batches_tracked"]) == NUM_BATCHES


@pytest.mark.ddp
@pytest.mark.slow
def test_sync_batchnorm_with_the_gate_equals_one_process(runs):
    """A SyncBatchNorm (here its CPU stand-in: statistics all-reduced in the forward and in each per-task
    backward) keeps the run exact: weights and running statistics of one process on the whole batch. (SGD: the
    bias before the BatchNorm has a zero gradient up to rounding, which Adam would blow up to full steps.)"""
    ref = _single("bn_sync", model=BNTinyNet(rule="unweighted", bn="hidden", optimizer="sgd"))
    for rank in runs["bn_sync"]:
        _same_params(rank["params"], params(ref))
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(rank["buffers"][f"1.{name}"], getattr(ref.trunk[1], name), atol=1e-5, rtol=1e-4)


def test_trainer_sync_batchnorm_layers_are_recognised_and_plain_ones_warned_about():
    model = BNTinyNet(rule="unweighted", bn="hidden")
    with pytest.warns(UserWarning, match=r"1 BatchNorm layer\(s\) \(trunk.1\).*sync_batchnorm=True"):
        check_buffers(model, set())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(
        BNTinyNet(rule="unweighted", bn="hidden")
    )  # what Lightning does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_buffers(converted, set())
        model.gradsim_sync_buffers = "broadcast"
        check_buffers(model, set())


# ---------------------------------------------------------------------- one process
def _two_task_setup():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    heads = [nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)]
    x = torch.randn(6, 4)
    return trunk, heads, x


def test_batched_path_keeps_the_finite_tasks_statistics_when_a_loss_is_infinite():
    """The vmap-batched backward used to turn every task's gradient into NaN (0 * inf) when one loss was
    non-finite; the step is skipped either way, but the finite tasks' norms and cosines are now kept."""
    out = {}
    for strategy in ("sequential", "batched"):
        trunk, heads, x = _two_task_setup()
        gate = GradientGate(rule="projection", main_grad_ema=0.5, cosine_ema=0.5)
        gate.grad_strategy = strategy
        for step in range(2):
            h = trunk(x)
            losses = [heads[0](h).pow(2).mean(), heads[1](h).mean(), heads[2](h).sin().mean()]
            if step == 1:
                losses[1] = torch.log(heads[1](h).mean() * 0)  # -inf
            state_before = {k: v.clone() for k, v in gate.state.state_dict().items() if isinstance(v, torch.Tensor)}
            stats = gate.backward(losses[0], losses[1:], trunk.parameters())
        out[strategy] = stats
        assert not bool(stats.finite) and int(gate.state.skipped_steps) == 1
        for key, value in state_before.items():  # the skipped step left the state alone, but for its counters
            if key not in ("skipped_steps", "step"):
                torch.testing.assert_close(gate.state.state_dict()[key], value, msg=key)
    seq, bat = out["sequential"], out["batched"]
    assert torch.isfinite(bat.main_norm) and torch.isfinite(bat.aux_norm[1]) and not torch.isfinite(bat.aux_norm[0])
    torch.testing.assert_close(bat.main_norm, seq.main_norm)
    torch.testing.assert_close(bat.aux_norm[1], seq.aux_norm[1])
    torch.testing.assert_close(bat.cosine, seq.cosine)


def test_backward_strategy_reads_grad_per_task_like_autograd_grad():
    """What the gate does under FSDP2, on one process: one backward per task, .grad read and cleared."""
    trunk, heads, x = _two_task_setup()
    h = trunk(x)
    losses = [heads[0](h).pow(2).mean(), heads[1](h).mean()]
    shared, others = list(trunk.parameters()), list(heads[0].parameters()) + list(heads[1].parameters())
    others[0].grad = torch.ones_like(others[0])  # an existing .grad is left as it was
    got = backward_gradients(losses, shared, others, retain_graph=True)
    ref = per_task_gradients(losses, shared, others, "sequential")
    for a, b in zip(got.rows, ref.rows):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.others, ref.others)
    assert all(p.grad is None for p in shared) and torch.equal(others[0].grad, torch.ones_like(others[0]))


def test_shard_layout_covers_every_element_once_in_order():
    numels = [7, 1, 0, 12, 5]
    for world in (1, 2, 3, 8):
        flat = torch.arange(sum(numels), dtype=torch.float32)
        tensors = list(torch.split(flat, numels))
        chunks = []
        for rank in range(world):
            layout = ShardLayout(numels, world, rank)
            chunk = torch.full((layout.chunk,), -1.0)
            for t, view, (lo, hi, _) in zip(tensors, layout.local(chunk), layout.pieces):
                view.copy_(t[lo:hi])
            chunks.append(chunk)
        whole = layout.whole(torch.cat(chunks), [torch.Size([n]) for n in numels])
        assert all(torch.equal(w, t) for w, t in zip(whole, tensors))


def test_packed_gate_state_round_trips_into_a_fresh_gate():
    """Under distributed checkpoints the state is saved packed; a fresh (unshaped) state loads it."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    gate = GradientGate(rule="projection", main_grad_ema=0.5, cosine_ema=0.5)
    for _ in range(2):
        gate.backward((w * w).sum(), [w.sin().sum()], [w])
    gate.state.packed = True
    packed = gate.state_dict()
    assert isinstance(packed["state._extra_state"], bytes) and "state.cosine_state" not in packed
    fresh = GradientGate(rule="projection", main_grad_ema=0.5, cosine_ema=0.5)
    assert fresh.state.cosine_state.numel() == 0  # unshaped before the load
    fresh.load_state_dict(packed)
    gate.state.packed = False
    tensors = {k: v for k, v in gate.state.state_dict().items() if isinstance(v, torch.Tensor)}
    assert {"cosine_state", "main_grad_ema_0", "step"} <= set(tensors)  # the loop below checks something
    for key, value in tensors.items():
        torch.testing.assert_close(fresh.state.state_dict()[key], value, msg=key)
    assert int(fresh.state.step) == 2 and float(gate.state.cosine_state.abs().sum()) > 0
    # and the fresh gate carries on exactly as the original: same gradient and smoothed cosine next step
    out = []
    with torch.no_grad():
        w.copy_(torch.tensor([0.3, -1.0, 2.0]))  # elsewhere: another cosine than the state's
    for g in (gate, fresh, GradientGate(rule="projection", main_grad_ema=0.5, cosine_ema=0.5)):
        w.grad = None
        stats = g.backward((w * w).sum(), [w.sin().sum()], [w])
        out.append((w.grad.clone(), stats.smoothed_cosine.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=0)
    assert not torch.equal(out[2][1], out[0][1])  # a gate without the state smooths otherwise: it can fail


def test_refusals_name_the_alternative():
    from types import SimpleNamespace

    class FSDPStrategy:  # stand in for Lightning's by name
        pass

    class ModelParallelStrategy:
        pass

    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy, not FSDPStrategy"):
        parallel_mode(SimpleNamespace(strategy=FSDPStrategy(), world_size=2))
    assert parallel_mode(SimpleNamespace(strategy=ModelParallelStrategy(), world_size=1)) == "fsdp2"
    from lightning_gradsim.lightning.validation import check_fsdp_trainer, check_trainer

    model = TinyNet(sync="local")
    with pytest.raises(MisconfigurationException, match="gradsim_sync = 'local'.*FSDP2"):
        check_fsdp_trainer(model, SimpleNamespace(precision_plugin=None), "local", 1)
    with pytest.raises(NotImplementedError, match="gradsim_accumulate_grad_batches"):
        check_fsdp_trainer(model, SimpleNamespace(precision_plugin=None), "global", 2)

    class DeepSpeedStrategy:
        pass

    with pytest.raises(MisconfigurationException, match="not DeepSpeedStrategy"):
        parallel_mode(SimpleNamespace(strategy=DeepSpeedStrategy(), world_size=2))

    class DDPStrategy:
        pass

    ddp = SimpleNamespace(strategy=DDPStrategy(), world_size=2, gradient_clip_val=None, accumulate_grad_batches=1)
    with pytest.raises(MisconfigurationException, match="'sharded' does not carry the task losses GradNorm"):
        check_trainer(TinyNet(method="gradnorm", sync="sharded"), ddp)
    with pytest.raises(ValueError, match="gradsim_sync_buffers must be 'none' or 'broadcast'"):
        model = TinyNet(sync="sharded")
        model.gradsim_sync_buffers = "sync"
        check_trainer(model, ddp)
