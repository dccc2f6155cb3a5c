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


def test_a_lightning_checkpoint_of_version_0_1_resumes_exactly(legacy, tmp_path):
    path = tmp_path / "v0_1.ckpt"
    torch.save(legacy["lightning_ckpt"], path)
    assert "gradsim.cosine_state" in legacy["lightning_ckpt"]["state_dict"]  # the old layout
    resumed = TinyNet("projection", "adam", GATE, seed=99)  # other init: everything comes from the file
    fit(resumed, make_batches(5, 8), ckpt_path=str(path))
    for name, p in legacy["full_params"].items():  # where version 0.1.0 itself ended
        torch.testing.assert_close(params(resumed)[name], p, atol=1e-6, rtol=0, msg=name)
    assert int(resumed.gradsim.state.step) == 5 and resumed.gradsim.aux_names == ["aux"]
    assert resumed.gradsim.main_grad_ema_0.shape == resumed.trunk[0].weight.shape


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
