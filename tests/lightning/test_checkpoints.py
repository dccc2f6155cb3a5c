"""Checkpoints written before the core/parallel/lightning tree (main at 4a050b7, the flat layout) load into
this tree and resume exactly; the old import paths still work for one release, with a DeprecationWarning.

The fixture comes from tests/fixtures/make_pre_tree_checkpoints.py run on that commit (the 0.1.0 fixture
is tests/lightning/test_legacy.py's)."""

from __future__ import annotations

import importlib
import io
import os
import sys
import warnings

import pytest
import torch

from lightning_gradsim import GradientGate
from lightning_gradsim._deprecated import MOVED

from ..scale_utils import TinyNet, fit, make_batches, params

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "pre_tree_4a050b7.pt")
GATE = {"main_grad_ema": 0.5, "cosine_ema": 0.5}


@pytest.fixture(scope="module")
def pre_tree():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.load(FIXTURE, weights_only=False)


def test_a_lightning_checkpoint_of_the_flat_layout_resumes_exactly(pre_tree, tmp_path):
    path = tmp_path / "pre_tree.ckpt"
    torch.save(pre_tree["lightning_ckpt"], path)
    assert int(pre_tree["lightning_ckpt"]["state_dict"]["gradsim.state.step"]) == 3
    resumed = TinyNet("projection", "adam", GATE, seed=99)  # other init: everything comes from the file
    fit(resumed, make_batches(5, 8), ckpt_path=str(path))
    for name, p in pre_tree["full_params"].items():  # where the flat layout itself ended
        torch.testing.assert_close(params(resumed)[name], p, atol=1e-6, rtol=0, msg=name)
    assert int(resumed.gradsim.state.step) == 5 and resumed.gradsim.aux_names == ["aux"]


def test_a_gate_pickled_by_its_old_module_paths_loads_as_the_new_classes(pre_tree):
    for old in MOVED:  # as in a fresh interpreter: no old path imported yet
        sys.modules.pop(f"lightning_gradsim.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gate = torch.load(io.BytesIO(pre_tree["pickled_gate"]), weights_only=False)
    assert type(gate) is GradientGate
    assert type(gate.loss_weighting).__module__ == "lightning_gradsim.loss_weighting.uncertainty"
    assert any(
        issubclass(w.category, DeprecationWarning) and "lightning_gradsim.gate" in str(w.message) for w in caught
    )
    # its state is the state that was saved, and a state_dict of the old layout loads into a new gate
    fresh = GradientGate(rule="sum", loss_weighting=type(gate.loss_weighting)(aux_tasks=["rot"], aux_weight=0.5))
    fresh.load_state_dict(pre_tree["gate_state"])
    for key, value in pre_tree["gate_state"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)
            torch.testing.assert_close(gate.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_path_warns_and_gives_the_same_objects(old):
    name = f"lightning_gradsim.{old}"
    sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match=f"{name} moved to"):
        module = importlib.import_module(name)
    for source in MOVED[old]:
        new = importlib.import_module(f"lightning_gradsim.{source}")
        for attr in getattr(new, "__all__", []):
            assert getattr(module, attr) is getattr(new, attr), f"{name}.{attr}"


def test_the_old_names_people_import_most():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from lightning_gradsim.gate import GradientGate as OldGate
        from lightning_gradsim.mixin import GradSimMixin as OldMixin
        from lightning_gradsim.transforms import AllReduce, Unscale
        from lightning_gradsim.weighting import GradNorm

    from lightning_gradsim import GradSimMixin
    from lightning_gradsim.core import Unscale as NewUnscale
    from lightning_gradsim.loss_weighting import GradNorm as NewGradNorm
    from lightning_gradsim.parallel import AllReduce as NewAllReduce

    assert (OldGate, OldMixin, AllReduce, Unscale, GradNorm) == (
        GradientGate,
        GradSimMixin,
        NewAllReduce,
        NewUnscale,
        NewGradNorm,
    )
