"""Gradient transforms and the seam they hook into: statuses instead of exceptions or NaN poisoning,
the per-layer Gramian between "local" and "decide", and the combined gradient after it is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradsim import GradientGate
from lightning_gradsim.core.task_gradients import TaskGradients
from lightning_gradsim.core.transforms import NON_FINITE, READY, Accumulate, GradientTransform, Transforms, Unscale


def _setup():
    torch.manual_seed(0)
    trunk, heads = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), [nn.Linear(3, 1), nn.Linear(3, 1)]
    x = torch.randn(6, 4)

    def losses():
        h = trunk(x)
        return heads[0](h).pow(2).mean(), (heads[1](h) - 1).pow(2).mean()

    return trunk, heads, losses


class Record(GradientTransform):
    def __init__(self, status=READY, flip=False, combined_finite=True):
        self.status, self.flip, self.combined_finite = status, flip, combined_finite
        self.seen: dict[str, object] = {}

    def task_gradients(self, grads):
        self.seen["task_gradients"] = (grads.num_tasks, len(grads.present()))
        return self.status

    def gramian(self, gram):
        self.seen["gramian"] = tuple(gram.shape)
        if self.flip:  # what a reduction over ranks could change: here, the sign of the main/aux dot
            gram = gram.clone()
            gram[..., 0, 1] = -gram[..., 0, 1]
            gram[..., 1, 0] = -gram[..., 1, 0]
        return gram

    def combined(self, params, others, finite):
        self.seen["combined"] = [p.grad is not None for p in params]
        return finite & torch.tensor(self.combined_finite)


def test_the_seam_per_layer_gramian_then_rule_then_combined():
    trunk, heads, losses = _setup()
    main, aux = losses()
    rec = Record()
    stats = GradientGate(rule="unweighted").backward(main, [aux], trunk.parameters(), transforms=[rec])
    assert rec.seen["task_gradients"] == (2, 4) and rec.seen["gramian"] == (4, 2, 2)  # 4 shared tensors, K = 2
    assert rec.seen["combined"] == [True] * 4  # after .grad was written
    assert bool(stats.finite)


def test_a_reduced_gramian_is_what_the_rule_decides_on():
    trunk, heads, losses = _setup()
    open_ = GradientGate(rule="unweighted").backward(*losses()[:1], [losses()[1]], trunk.parameters())
    flipped = GradientGate(rule="unweighted").backward(
        *losses()[:1], [losses()[1]], trunk.parameters(), transforms=[Record(flip=True)]
    )
    assert open_.gate_open.item() != flipped.gate_open.item()
    torch.testing.assert_close(flipped.cosine, -open_.cosine)


def test_a_non_finite_status_writes_nothing_and_counts_the_step_as_skipped():
    trunk, heads, losses = _setup()
    gate = GradientGate(rule="unweighted", cosine_ema=0.5)
    main, aux = losses()
    stats = gate.backward(main, [aux], trunk.parameters(), transforms=[Record(status=NON_FINITE)])
    assert not bool(stats.finite)
    assert all(p.grad is None for p in trunk.parameters()) and all(
        p.grad is None for h in heads for p in h.parameters()
    )
    assert gate.state.skipped_steps.item() == 1 and gate.state.measured_steps.item() == 0


def test_a_transform_that_finds_a_nan_after_the_gradients_are_written_moves_the_step_to_skipped():
    trunk, heads, losses = _setup()
    gate = GradientGate(rule="unweighted")
    main, aux = losses()
    stats = gate.backward(main, [aux], trunk.parameters(), transforms=[Record(combined_finite=False)])
    assert not bool(stats.finite)
    assert gate.state.skipped_steps.item() == 1 and gate.state.measured_steps.item() == 0


def test_pending_returns_none_and_the_window_mean_equals_the_large_batch():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    xs = torch.randn(4, 3)
    gate, ref = GradientGate(rule="projection"), GradientGate(rule="projection")
    acc = Accumulate()
    for i in range(2):
        acc.final = i == 1
        half = xs[2 * i : 2 * i + 2]
        out = gate.backward(
            (half @ w).pow(2).mean() * 8, [(half @ w).sin().mean() * 8], [w], transforms=[acc, Unscale(1 / 8)]
        )
        assert (out is None) == (i == 0)
    w_ref = nn.Parameter(w.detach().clone())
    ref.backward((xs @ w_ref).pow(2).mean(), [(xs @ w_ref).sin().mean()], [w_ref])
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert int(gate.state.step) == 1


def test_a_pipeline_serves_one_call_and_needs_the_parameter_path():
    trunk, heads, losses = _setup()
    pipeline = Transforms([Record()])
    GradientGate().backward(*losses()[:1], [losses()[1]], trunk.parameters(), transforms=pipeline)
    with pytest.raises(RuntimeError, match="serves one gate.backward"):
        GradientGate().backward(*losses()[:1], [losses()[1]], trunk.parameters(), transforms=pipeline)
    with pytest.raises(ValueError, match="need the per-task parameter gradients"):
        GradientGate(every_n_steps=2).backward(
            *losses()[:1], [losses()[1]], trunk.parameters(), transforms=[Unscale(0.5)]
        )
    with pytest.raises(TypeError, match="GradientTransform"):
        Transforms([lambda g: "ready"])


def test_accumulate_keeps_a_window_across_a_checkpoint():
    acc = Accumulate()
    acc.final = False
    acc.task_gradients(
        TaskGradients(rows=[[torch.ones(2)], [2 * torch.ones(2)]], others=[torch.ones(1)], finite=torch.tensor(True))
    )
    state = acc.state_dict()
    assert state["count"] == 1 and state["shared"][0].shape == (2, 2)  # saved stacked, as before
    restored = Accumulate()
    restored.load_state_dict(state)
    restored.final = True
    grads = TaskGradients(rows=[[3 * torch.ones(2)], [torch.zeros(2)]], others=[None], finite=torch.tensor(False))
    assert restored.task_gradients(grads) == READY
    assert grads.stacked is None  # the rows layout of the new micro-batch is kept
    torch.testing.assert_close(grads.rows[0][0], 2 * torch.ones(2))
    torch.testing.assert_close(grads.rows[1][0], torch.ones(2))
    assert not bool(grads.finite)  # one non-finite micro-batch makes the window non-finite
