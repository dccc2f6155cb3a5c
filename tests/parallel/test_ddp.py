"""Real 2-process CPU DDP (gloo) runs against single-process runs on the concatenated batches.

All DDP scenarios run in ONE pair of spawned processes (module fixture) to pay the process and
import start-up once; each test then checks its scenario's saved weights and gate logs. The
workers are started like ``torchrun`` does (rank in the environment) and use Lightning's
``strategy="ddp"``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.multiprocessing as mp

from lightning_gradsim.parallel.collectives import all_reduce_mean, world_size

from .._spawn import free_port
from ..scale_utils import TinyNet, ddp_worker, fit, make_batches, merge_pairs, params, rank_slice

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.timeout(300)]

WORLD = 2
NUM_BATCHES, BATCH = 10, 8  # global batch 8 = 4 per rank

SCENARIOS = [
    {"name": "unweighted", "model": {"rule": "unweighted", "gate": {"cosine_ema": 0.5}}},
    {"name": "projection", "model": {"rule": "projection", "optimizer": "sgd", "gate": {"main_grad_ema": 0.5}}},
    {"name": "accumulate", "model": {"rule": "unweighted", "accumulate": 2}},
    {"name": "local", "model": {"rule": "unweighted", "sync": "local"}},
    # Resume: the full run checkpoints mid-epoch at step 4; a second run resumes from it.
    {
        "name": "full",
        "model": {"rule": "projection", "gate": {"main_grad_ema": 0.5, "cosine_ema": 0.5}, "scheduler": True},
        "checkpoint_every": 4,
        "trainer": {"max_epochs": 2},
    },
    {
        "name": "resumed",
        "model": {"rule": "projection", "gate": {"main_grad_ema": 0.5, "cosine_ema": 0.5}, "scheduler": True},
        "trainer": {"max_epochs": 2},
        "resume_from": "full/step=4.ckpt",
    },
    # GradNorm: its weights adapt from the global losses and gradient norms.
    {"name": "gradnorm", "model": {"method": "gradnorm", "optimizer": "sgd", "gate": {"lr": 1.0}}},
    # DWA and RLW: weights from the global losses / one seeded draw per step, the same on every rank.
    {"name": "dwa", "model": {"method": "dwa", "optimizer": "sgd"}},
    {"name": "rlw", "model": {"method": "rlw", "optimizer": "sgd", "gate": {"seed": 4}}},
    # A stateful rule (GradVac's EMA targets, from the global Gramian) and a torchjd weighting.
    {"name": "gradvac", "model": {"method": "gradvac", "optimizer": "sgd", "gate": {"beta": 0.3}}},
    # 16-mixed with a CPU GradScaler; rank 1 alone overflows on its 3rd batch (see worker).
    {
        "name": "scaler",
        "model": {"rule": "unweighted", "inject_inf_at": (2,)},
        "inject_rank": 1,
        "scaler": {"init_scale": 2.0**8},
    },
]
if importlib.util.find_spec("torchjd") is not None and importlib.util.find_spec("qpsolvers") is not None:
    SCENARIOS.append({"name": "upgrad", "model": {"method": "torchjd:UPGrad", "optimizer": "sgd"}})
for sc in SCENARIOS:
    sc.setdefault("num_batches", NUM_BATCHES)
    sc.setdefault("batch_size", BATCH)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(WORLD, free_port(), str(out), SCENARIOS), nprocs=WORLD, join=True)
    return {
        sc["name"]: [
            torch.load(os.path.join(out, f"{sc['name']}_rank{r}.pt"), weights_only=False) for r in range(WORLD)
        ]
        for sc in SCENARIOS
    }


def _single(name: str, batches=None, **overrides):
    sc = next(s for s in SCENARIOS if s["name"] == name)
    batches = batches if batches is not None else make_batches(sc["num_batches"], sc["batch_size"])
    model_kwargs = {**sc["model"], **overrides}
    return fit(TinyNet(**model_kwargs), batches, **sc.get("trainer", {}))


def _assert_same_log(a, b, atol=1e-5):
    assert len(a) == len(b), (len(a), len(b))
    for step, ((ca, oa, sa), (cb, ob, sb)) in enumerate(zip(a, b)):
        assert oa == ob and sa == sb, f"gate decision differs at step {step}: {oa, sa} vs {ob, sb}"
        torch.testing.assert_close(torch.tensor(ca), torch.tensor(cb), atol=atol, rtol=1e-4)


def _assert_same_params(a, b, atol=1e-5):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=f"parameter {name}")


@pytest.mark.parametrize("name", ["unweighted", "projection"])
def test_ddp_equals_single_process_on_the_concatenated_batch(ddp_results, name):
    ref = _single(name)
    ranks = ddp_results[name]
    for r in range(WORLD):
        _assert_same_params(ranks[r]["params"], params(ref))
        _assert_same_log(ranks[r]["gate_log"], ref.gate_log)
    assert ranks[0]["gate_log"] == ranks[1]["gate_log"]  # bit-identical decisions on every rank
    assert len(ref.gate_log) == NUM_BATCHES
    if name == "unweighted":
        opened = [o for _, opens, _ in ref.gate_log for o in opens]
        assert any(opened) and not all(opened), "the data should both open and close the gate"


def test_ddp_gradnorm_equals_single_process_on_the_concatenated_batch(ddp_results):
    """Every rank adapts GradNorm's weights from the global losses and norms: the same weights on
    both ranks, equal to one process on the whole batch (with local losses the ranks drift apart)."""
    ref = _single("gradnorm")
    weights = ref.gradsim.loss_weighting.task_weights
    assert (weights - 1).abs().max() > 0.02  # they moved
    for r in range(WORLD):
        rank = ddp_results["gradnorm"][r]
        _assert_same_params(rank["params"], params(ref))
        torch.testing.assert_close(rank["gate"]["loss_weighting.task_weights"], weights, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            rank["gate"]["loss_weighting.initial_losses"], ref.gradsim.loss_weighting.initial_losses
        )


@pytest.mark.parametrize("name", ["dwa", "rlw"])
def test_ddp_dwa_and_rlw_equal_single_process_on_the_concatenated_batch(ddp_results, name):
    """DWA's weights come from the global losses and RLW's from one seeded draw per optimizer step:
    both ranks hold the same weights and parameters as one process on the whole batch."""
    ref = _single(name)
    weights = ref.gradsim.loss_weighting.task_weights
    assert (weights - 1).abs().max() > 1e-3  # not all 1
    for r in range(WORLD):
        rank = ddp_results[name][r]
        _assert_same_params(rank["params"], params(ref))
        torch.testing.assert_close(rank["gate"]["loss_weighting.task_weights"], weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["gradvac", "upgrad"])
def test_ddp_gramian_rules_with_state_or_solvers_equal_single_process(ddp_results, name):
    """GradVac's targets and torchjd's UPGrad weights come from the reduced (global) Gramian: the same on
    every rank, equal to one process on the whole batch."""
    if name not in ddp_results:
        pytest.skip('torchjd is not installed: pip install -e ".[torchjd]"')
    ref = _single(name)
    for r in range(WORLD):
        rank = ddp_results[name][r]
        _assert_same_params(rank["params"], params(ref))
        _assert_same_log(rank["gate_log"], ref.gate_log)
        if name == "gradvac":
            torch.testing.assert_close(rank["gate"]["rule.target"], ref.gradsim.rule.target, atol=1e-6, rtol=1e-5)
    if name == "gradvac":
        assert float(ref.gradsim.rule.target.abs().max()) > 0.01  # the targets moved


def test_ddp_sync_is_one_bucketed_all_reduce_per_step(ddp_results):
    model = TinyNet()
    shared = sum(p.numel() for p in model.trunk.parameters())
    heads = sum(p.numel() for p in model.main_head.parameters()) + sum(p.numel() for p in model.aux_head.parameters())
    expected = 2 * shared + heads + 1  # K=2 stacked task gradients, summed head gradients, the non-finite flag
    for name, calls in (("unweighted", NUM_BATCHES), ("accumulate", NUM_BATCHES // 2)):
        sizes = ddp_results[name][0]["all_reduce_sizes"]
        assert sizes.count(expected) == calls, sizes
        assert all(n == expected or n <= 1 for n in sizes), sizes  # others: Lightning's scalar bookkeeping
    local = ddp_results["local"][0]["all_reduce_sizes"]
    assert local.count(shared + heads + 1) == NUM_BATCHES, local


def test_ddp_reference_is_discriminative():
    """Guard for the test above: one rank's half batch alone trains to other weights and gates."""
    full = _single("unweighted")
    half = _single("unweighted", batches=rank_slice(make_batches(NUM_BATCHES, BATCH), 0, WORLD))
    assert not torch.allclose(full.trunk[0].weight, half.trunk[0].weight, atol=1e-3)


def test_ddp_accumulation_equals_single_process_large_batch(ddp_results):
    batches = merge_pairs(make_batches(NUM_BATCHES, BATCH), 2)
    ref = _single("accumulate", batches=batches, accumulate=1)
    for r in range(WORLD):
        _assert_same_params(ddp_results["accumulate"][r]["params"], params(ref))
        _assert_same_log(ddp_results["accumulate"][r]["gate_log"], ref.gate_log)


def test_ddp_local_sync_keeps_ranks_in_step_and_averages_updates(ddp_results):
    ranks = ddp_results["local"]
    # Weights stay identical on every rank (the combined gradient is all-reduced) ...
    _assert_same_params(ranks[0]["params"], ranks[1]["params"], atol=0)
    # ... but each rank gated on its own cosine, so this is not the exact run.
    exact = _single("unweighted", gate={})
    assert ranks[0]["gate_log"] != ranks[1]["gate_log"]
    assert not all(torch.allclose(ranks[0]["params"][n], p, atol=1e-5) for n, p in params(exact).items())


def test_ddp_resume_mid_epoch_is_exact(ddp_results):
    full, resumed = ddp_results["full"], ddp_results["resumed"]
    ref = _single("full")
    for r in range(WORLD):
        _assert_same_params(full[r]["params"], params(ref))
        _assert_same_params(resumed[r]["params"], full[r]["params"], atol=1e-6)
        for key, value in full[r]["gate"].items():
            torch.testing.assert_close(resumed[r]["gate"][key], value, atol=1e-6, rtol=1e-6, msg=key)
        # The resumed run logged the steps after the checkpoint, identical to the full run's.
        _assert_same_log(resumed[r]["gate_log"], full[r]["gate_log"][4:], atol=1e-6)


def test_ddp_scaler_overflow_on_one_rank_skips_everywhere(ddp_results):
    ranks = ddp_results["scaler"]
    for r in range(WORLD):
        skipped = [s for _, _, s in ranks[r]["gate_log"]]
        assert skipped == [False, False, True] + [False] * (NUM_BATCHES - 3), skipped
        assert int(ranks[r]["gate"]["state.skipped_steps"]) == 1
        assert ranks[r]["scale"] == 2.0**7  # backed off once, no growth within 2000 steps
    _assert_same_params(ranks[0]["params"], ranks[1]["params"], atol=0)


def test_all_reduce_mean_is_identity_without_a_process_group():
    assert world_size() == 1
    t = [torch.ones(3), torch.zeros(2, dtype=torch.float64)]
    out, bad = all_reduce_mean(t, nonfinite=torch.tensor(True))
    assert out[0] is t[0] and bool(bad)


def test_sharded_strategies_and_bad_sync_mode_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class FSDPStrategy:  # stands in for Lightning's, by name
        pass

    model = TinyNet()
    model._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(MisconfigurationException, match="not FSDPStrategy"):
        model._gradsim_world_size()
    model.gradsim_sync = "ring"
    with pytest.raises(ValueError, match="gradsim_sync must be one of: 'global'.*'local'.*got 'ring'"):
        fit(model, make_batches(2, 4))
