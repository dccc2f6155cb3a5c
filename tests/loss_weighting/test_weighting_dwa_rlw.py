"""DWA and RLW: hand-computed DWA weights, RLW's distribution and seeding, state round trips,
composition with a cosine gate, and accumulation equal to one step on the larger batch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_gradsim import GradientGate
from lightning_gradsim.loss_weighting import DWA, RLW, dwa_weights
from lightning_gradsim.methods import list_methods, make_gate

from ..scale_utils import TinyNet, fit, make_batches, merge_pairs, params

torch.set_num_threads(1)


def _softmax_by_hand(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_registered_and_built_by_make_gate():
    assert {"dwa", "rlw"} <= set(list_methods())
    gate = make_gate("dwa", temperature=3.0, period=2, aux_weight=0.5)
    assert isinstance(gate.loss_weighting, DWA) and gate.rule_name == "sum"
    assert (gate.loss_weighting.temperature, gate.loss_weighting.period, gate.loss_weighting.aux_weight) == (
        3.0,
        2,
        0.5,
    )
    gate = make_gate("rlw", seed=7, rule="unweighted", threshold=0.1)
    assert isinstance(gate.loss_weighting, RLW) and gate.loss_weighting.seed == 7 and gate.seed == 7
    assert gate.rule_name == "unweighted" and gate.threshold == 0.1


# ---------------------------------------------------------------- DWA
def test_dwa_weights_from_a_given_loss_history_by_hand():
    """Three tasks, period 1: weights 1 for two steps, then K softmax(L(t-1)/L(t-2) / T)."""
    dwa = DWA(temperature=2.0)
    history = [[2.0, 1.0, 4.0], [1.0, 1.0, 2.0], [0.5, 0.8, 2.0], [0.4, 0.4, 1.0]]
    seen = []
    for losses in history:
        seen.append(torch.stack(dwa.loss_weights(3, torch.zeros((), dtype=torch.float64))).tolist())
        dwa.record(torch.tensor(losses, dtype=torch.float64), torch.tensor(True))
    seen.append(dwa.task_weights.tolist())
    assert seen[0] == [1.0, 1.0, 1.0] and seen[1] == [1.0, 1.0, 1.0]
    for t in (2, 3, 4):  # weights of step t from the losses of steps t-1 and t-2
        ratios = [a / b for a, b in zip(history[t - 1], history[t - 2])]
        expected = [3 * s for s in _softmax_by_hand([r / 2.0 for r in ratios])]
        assert seen[t] == pytest.approx(expected, rel=1e-12), t
    # step 3: ratios (0.5, 0.8, 1.0) -> the task whose loss fell least gets the most weight
    assert seen[3][2] > seen[3][1] > seen[3][0]


def test_dwa_period_averages_the_losses_of_each_period_and_skips_non_finite_steps():
    dwa = DWA(temperature=1.0, period=2)
    steps = [[4.0, 2.0], [2.0, 2.0], [float("nan"), 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.5], [0.5, 0.5], [0.2, 0.2]]
    for losses in steps:
        dwa.record(torch.tensor(losses, dtype=torch.float64), torch.tensor(True))
    # periods (finite steps only): means (3, 2), (1, 1), (0.75, 0.5); the last step is pending
    assert int(dwa.periods) == 3 and int(dwa.running_steps) == 1
    ratios = [0.75 / 1.0, 0.5 / 1.0]
    torch.testing.assert_close(
        dwa.task_weights, torch.tensor([2 * s for s in _softmax_by_hand(ratios)], dtype=torch.float64)
    )
    # a step the gate reports non-finite (e.g. another rank's NaN) is not recorded either
    before = copy.deepcopy(dwa.state_dict())
    dwa.record(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor(False))
    for k, v in dwa.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_dwa_weights_function_and_bad_arguments():
    torch.testing.assert_close(dwa_weights(torch.ones(2), torch.ones(2)), torch.ones(2))
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    with pytest.raises(ValueError, match="period"):
        DWA(period=0)
    with pytest.raises(ValueError, match="per-layer Gramian"):
        GradientGate(rule="sum", loss_weighting=DWA(), every_n_steps=2)


def _quadratic_step(gate, w, targets):
    """main = |w - a|^2 / 2, aux = |w - b|^2 / 2 (with aux_weight in the gate's weighting)."""
    w.grad = None
    main = 0.5 * (w - targets[0]).pow(2).sum()
    aux = 0.5 * (w - targets[1]).pow(2).sum()
    stats = gate.backward(main, {"aux": aux}, [w])
    return stats, torch.stack([main.detach(), aux.detach()])


def test_dwa_composes_with_the_unweighted_gate():
    """Under the unweighted gate the DWA-weighted auxiliary gradient is added while it agrees with the
    main one: .grad = w_main g_main + w_aux lambda g_aux (open), w_main g_main (closed)."""
    gate = GradientGate(rule="unweighted", loss_weighting=DWA(temperature=2.0, aux_weight=0.5))
    w = nn.Parameter(torch.tensor([3.0, 1.0], dtype=torch.float64))
    a = torch.tensor([0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    history = []
    for step in range(4):
        weights = gate.loss_weighting.task_weights.clone() if step else torch.ones(2, dtype=torch.float64)
        g_main, g_aux = (w - a).detach(), (w - b).detach()
        stats, losses = _quadratic_step(gate, w, (a, b))
        history.append(losses)
        cos = float(g_main @ g_aux / (g_main.norm() * g_aux.norm()))
        expected = weights[0] * g_main + (weights[1] * 0.5 * g_aux if cos >= 0 else 0)
        torch.testing.assert_close(w.grad, expected)
        assert stats.gate_open.tolist() == [cos >= 0]
        with torch.no_grad():
            w -= 0.3 * w.grad
    ratios = (history[3] / history[2]).tolist()
    torch.testing.assert_close(
        gate.loss_weighting.task_weights,
        torch.tensor([2 * s for s in _softmax_by_hand([r / 2 for r in ratios])], dtype=torch.float64),
    )
    assert set(gate.extra_metrics()) == {"task_weight/main", "task_weight/aux"}


def test_dwa_state_dict_round_trip_resumes_exactly():
    def run(gate, w, steps):
        out = []
        for _ in range(steps):
            _quadratic_step(gate, w, (torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)))
            with torch.no_grad():
                w -= 0.2 * w.grad
            out.append(gate.loss_weighting.task_weights.clone())
        return out

    w = nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))
    gate = make_gate("dwa", period=2)
    run(gate, w, 5)
    saved, w_saved = copy.deepcopy(gate.state_dict()), w.detach().clone()
    tail = run(gate, w, 4)
    fresh = make_gate("dwa", period=2)
    fresh.load_state_dict(saved)
    w2 = nn.Parameter(w_saved)
    assert torch.equal(fresh.loss_weighting.running, torch.as_tensor(saved["loss_weighting.running"]))
    for x, y in zip(run(fresh, w2, 4), tail):
        assert torch.equal(x, y)
    assert not torch.equal(tail[-1], torch.ones(2, dtype=torch.float64))  # the weights moved
    fresh.reset_state()
    assert fresh.loss_weighting.task_weights.numel() == 0 and int(fresh.loss_weighting.periods) == 0


# ---------------------------------------------------------------- RLW
def test_rlw_weights_are_a_softmax_of_standard_normal_draws():
    """The draws equal softmax(torch.randn(K)) from a generator seeded like the weighting's, one per step."""
    rlw = RLW(seed=11, scale=2.0)
    reference = torch.Generator().manual_seed(11)
    for _ in range(5):
        w = torch.stack(rlw.loss_weights(3, torch.zeros((), dtype=torch.float64)))
        z = torch.randn(3, generator=reference, dtype=torch.float64)
        torch.testing.assert_close(w, 2.0 * torch.softmax(z, dim=0), rtol=0, atol=0)
        rlw.step()


def test_rlw_distribution():
    """Many draws: every weight in (0, scale), the sum is scale, each task's mean is scale / K by symmetry,
    and the weights vary (the spread of a softmax of 3 standard normals: std of a weight ~0.19)."""
    rlw = RLW(seed=0)
    draws = []
    for _ in range(4000):
        draws.append(torch.stack(rlw.loss_weights(3, torch.zeros((), dtype=torch.float64))))
        rlw.step()
    d = torch.stack(draws)
    assert bool((d > 0).all()) and bool((d < 1).all())
    torch.testing.assert_close(d.sum(-1), torch.ones(4000, dtype=torch.float64))
    torch.testing.assert_close(d.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)
    assert 0.12 < float(d.std(0).min()) and float(d.std(0).max()) < 0.26
    assert int(rlw.draws) == 4001


def test_rlw_seed_same_draws_and_different_seeds_differ():
    def draws(seed):
        rlw = RLW(seed=seed)
        out = []
        for _ in range(3):
            out.append(torch.stack(rlw.loss_weights(2, torch.zeros(()))))
            rlw.step()
        return torch.stack(out)

    assert torch.equal(draws(5), draws(5))
    assert not torch.equal(draws(5), draws(6))


def test_rlw_composes_with_the_unweighted_gate_and_draws_once_per_step():
    gate = GradientGate(rule="unweighted", loss_weighting=RLW(seed=3, aux_weight=0.5))
    w = nn.Parameter(torch.tensor([2.0, 1.0], dtype=torch.float64))
    a, b = torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    reference = torch.Generator().manual_seed(3)
    for _ in range(3):
        weights = torch.softmax(torch.randn(2, generator=reference, dtype=torch.float64), 0)
        g_main, g_aux = (w - a).detach(), (w - b).detach()
        stats, _ = _quadratic_step(gate, w, (a, b))
        torch.testing.assert_close(w.grad, weights[0] * g_main + weights[1] * 0.5 * g_aux)  # agreeing: open
        torch.testing.assert_close(stats.weight, (weights[1] * 0.5).reshape(1))
        with torch.no_grad():
            w -= 0.1 * w.grad
    assert int(gate.loss_weighting.draws) == 4  # the first draw, then one per observed step


def test_rlw_state_dict_round_trip_resumes_the_draws():
    gate = make_gate("rlw", seed=2)
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    target = (torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    for _ in range(3):
        _quadratic_step(gate, w, target)
    saved = copy.deepcopy(gate.state_dict())
    tail = []
    for _ in range(3):
        _quadratic_step(gate, w, target)
        tail.append(gate.loss_weighting.task_weights.clone())
    fresh = make_gate("rlw", seed=99)  # the generator's state comes from the checkpoint
    fresh.load_state_dict(saved)
    for x in tail:
        _quadratic_step(fresh, w, target)
        assert torch.equal(fresh.loss_weighting.task_weights, x)
    fresh.reset_state()
    again = make_gate("rlw", seed=99)
    assert torch.equal(
        torch.stack(fresh.loss_weighting.loss_weights(2, w)), torch.stack(again.loss_weighting.loss_weights(2, w))
    )


# ---------------------------------------------------------------- accumulation (global losses)
@pytest.mark.parametrize("method", ["dwa", "rlw"])
def test_accumulation_equals_one_step_on_the_larger_batch(method):
    """The weights change once per optimizer step from the window's mean losses (DWA) or one draw (RLW)."""
    batches = make_batches(8, 4)
    acc = fit(TinyNet(method=method, optimizer="sgd", accumulate=2), batches)
    ref = fit(TinyNet(method=method, optimizer="sgd"), merge_pairs(batches, 2))
    w_acc, w_ref = acc.gradsim.loss_weighting.task_weights, ref.gradsim.loss_weighting.task_weights
    assert (w_ref - 1).abs().max() > 1e-3  # the weights are not all 1
    torch.testing.assert_close(w_acc, w_ref, atol=1e-6, rtol=1e-5)
    for (name, x), y in zip(params(acc).items(), params(ref).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
