"""Checkpoints written by version 0.1.0 (before the gate's state had its own module and loss
weightings were composed with the gate) load into this version and resume exactly; what cannot
load says why. The fixture comes from tests/fixtures/make_legacy_checkpoints.py run on 0.1.0."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_gradsim import GradientGate
from lightning_gradsim.methods import make_gate

from ..scale_utils import TinyNet, fit, make_batches, params

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "legacy_v0_1.pt")
GATE = {"main_grad_ema": 0.5, "cosine_ema": 0.5}


@pytest.fixture(scope="module")
def legacy():
    return torch.load(FIXTURE, weights_only=False)


def _continue_by_hand(ckpt: dict, batches: list) -> TinyNet:
    """The steps after the checkpoint without Lightning: the weights, Adam's state and the gate's state
    loaded by hand, then a plain loop of ``gate.backward`` and ``opt.step``."""
    model = TinyNet("projection", "adam", GATE, seed=7)
    model.load_state_dict(ckpt["state_dict"])  # the gate's old keys move to its state on load
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    opt.load_state_dict(ckpt["optimizer_states"][0])
    shared = list(model.trunk.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in shared)]
    for i, batch in enumerate(batches):
        opt.zero_grad()
        losses = model.task_losses(batch, i)
        stats = model.gradsim.backward(losses["main"], {"aux": losses["aux"]}, shared, other_params=others)
        assert bool(stats.finite)
        opt.step()
    return model


def test_a_lightning_checkpoint_of_version_0_1_resumes_exactly(legacy, tmp_path):
    path = tmp_path / "v0_1.ckpt"
    torch.save(legacy["lightning_ckpt"], path)
    assert "gradsim.cosine_state" in legacy["lightning_ckpt"]["state_dict"]  # the old layout
    assert legacy["lightning_ckpt"]["global_step"] == 3
    batches = make_batches(5, 8)
    resumed = TinyNet("projection", "adam", GATE, seed=99)  # other init: everything comes from the file
    fit(resumed, batches, ckpt_path=str(path))
    assert int(resumed.gradsim.state.step) == 5 and resumed.gradsim.aux_names == ["aux"]
    assert resumed.gradsim.main_grad_ema_0.shape == resumed.trunk[0].weight.shape
    # The truth, computed here: the same two steps by hand from the file's weights, optimizer and gate
    # state. Same machine, same operations: equal up to float32 rounding of the same sums.
    by_hand = params(_continue_by_hand(legacy["lightning_ckpt"], batches[3:]))
    start = {k: v for k, v in legacy["lightning_ckpt"]["state_dict"].items() if k in by_hand}
    for name, p in by_hand.items():
        torch.testing.assert_close(params(resumed)[name], p, atol=1e-7, rtol=1e-6, msg=name)
        # the two steps moved every tensor (a resume that ignored the file would not match anyway)
        assert float((p - start[name]).abs().max()) > 1e-4, name
    # Where version 0.1.0 ended on the machine that wrote the file. Another machine's float32 sums differ
    # in the last bits; Adam's step lr * m / sqrt(v) is scale-free, so relative gradient errors of ~1e-6
    # move a weight by ~lr * 1e-6 per step: atol 1e-5 (500 lr * 1e-6 over 2 steps) leaves room for
    # ill-conditioned elements and still fails on any real change of the update (which moves by ~lr).
    for name, p in legacy["full_params"].items():
        torch.testing.assert_close(params(resumed)[name], p, atol=1e-5, rtol=0, msg=name)


def test_weighting_gates_of_version_0_1_load_into_composed_gates(legacy):
    old = legacy["weighting"]
    unc = make_gate("uncertainty", aux_tasks=["rot"], aux_weight=0.5)
    unc.load_state_dict(old["uncertainty"])
    torch.testing.assert_close(unc.loss_weighting.log_vars.detach(), old["uncertainty"]["log_vars"])
    assert int(unc.state.step) == 3 and unc.aux_names == ["rot"]
    gn = make_gate("gradnorm", lr=0.1)
    gn.load_state_dict(old["gradnorm"])
    for key in ("task_weights", "initial_losses", "weight_updates"):
        torch.testing.assert_close(getattr(gn.loss_weighting, key), old["gradnorm"][key])
    assert int(gn.loss_weighting.weight_updates) == 3


def test_a_weighting_checkpoint_into_a_plain_gate_says_what_to_build(legacy):
    with pytest.raises(RuntimeError, match="has a loss weighting's state .*log_vars.*make_gate\\('uncertainty'"):
        GradientGate(rule="sum").load_state_dict(legacy["weighting"]["uncertainty"])
