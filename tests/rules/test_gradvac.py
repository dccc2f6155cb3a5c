"""GradVac (asymmetric, whole trunk): against a vector-by-vector implementation of the paper's update,
against torchjd's GradVacWeighting with two tasks, its state in the gate's state_dict, Proposition 1
with ``min_target=0``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_gradsim import GradientGate
from lightning_gradsim.methods import make_gate
from lightning_gradsim.rules import GradVac, get_rule, gradvac_coefficients

torch.set_num_threads(1)
DT = torch.float64


def _vectors(steps: int, num_aux: int, dim: int = 5, seed: int = 0, shift: float = -0.6):
    """Random main/aux vectors; the auxiliary ones lean against the main one (``shift``) so that
    both adjusted and unadjusted steps occur."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        main = torch.randn(dim, generator=g, dtype=DT)
        aux = [torch.randn(dim, generator=g, dtype=DT) + shift * main for _ in range(num_aux)]
        out.append((main, aux))
    return out


def _reference(steps, beta, lam, eps=0.0, min_target=None):
    """The paper's update on explicit vectors: g_k moved toward g_main when cos < target; EMA every step."""
    targets = [0.0] * len(steps[0][1])
    outs, adjusted_any = [], False
    for main, auxes in steps:
        out = main.clone()
        for k, g in enumerate(auxes):
            cos = float(g @ main / (g.norm() * main.norm() + eps))
            t = targets[k] if min_target is None else max(targets[k], min_target)
            moved = g
            if cos < t:
                coef = g.norm() * (t * math.sqrt(1 - cos**2) - cos * math.sqrt(1 - t**2))
                coef = coef / (main.norm() * math.sqrt(1 - t**2) + eps)
                moved = g + coef * main
                # independent check of the formula: the moved vector's cosine with main is the target
                assert float(moved @ main / (moved.norm() * main.norm())) == pytest.approx(t, abs=1e-12)
                adjusted_any = True
            out = out + lam[k] * moved
            targets[k] = (1 - beta) * targets[k] + beta * cos
        outs.append(out)
    assert adjusted_any
    return outs, targets


@pytest.mark.parametrize("num_aux, lam", [(1, [1.0]), (2, [0.5, 2.0])])
def test_gradvac_equals_the_vector_update_over_steps(num_aux, lam):
    steps = _vectors(12, num_aux)
    expected, targets = _reference(steps, beta=0.3, lam=lam)
    aux_weight = {f"aux{k}": lam[k] for k in range(num_aux)}
    gate = GradientGate(rule=GradVac(beta=0.3), aux_weight=aux_weight)
    for (main, aux), want in zip(steps, expected):
        got, stats = gate.combine(main, {f"aux{k}": a for k, a in enumerate(aux)})
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gate.rule.target, torch.tensor(targets, dtype=DT), rtol=1e-12, atol=1e-12)
    assert int(gate.rule.updates) == 12


def test_gradvac_gate_backward_writes_the_combination_and_heads_get_their_own_gradient():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4).double(), [nn.Linear(4, 1).double() for _ in range(3)]
    x = torch.randn(8, 3, dtype=DT)
    ys = [torch.randn(8, 1, dtype=DT) for _ in range(3)]
    gate = GradientGate(rule=GradVac(min_target=0.9), aux_weight=0.7)  # a high target: both auxiliaries move
    shared = list(trunk.parameters())

    def losses():
        h = torch.tanh(trunk(x))
        return [((hd(h) - y) ** 2).mean() for hd, y in zip(heads, ys)]

    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses()]
    flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in per_task]
    (expected,), _ = _reference([(flat[0], flat[1:])], beta=0.01, lam=[0.7, 0.7], min_target=0.9)
    ls = losses()
    stats = gate.backward(ls[0], ls[1:], shared)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)
    assert stats.gate_open.tolist() == [False, False]
    for head, loss in zip(heads, losses()):
        own = torch.autograd.grad(loss, list(head.parameters()))
        for p, g in zip(head.parameters(), own):
            torch.testing.assert_close(p.grad, g)


def test_gradvac_main_weight_equals_torchjd_gradvac_with_two_tasks():
    """Two tasks: torchjd's (symmetric) GradVacWeighting gives w = (1 + c_main, 1 + c_aux), where c_main
    moves the auxiliary gradient toward the main one (our only correction) and c_aux the main toward the
    auxiliary one (which we never do); its two targets are ours."""
    aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd not installed (pip install -e .[torchjd])")
    theirs = aggregation.GradVacWeighting(beta=0.2, eps=1e-8)
    ours = GradVac(beta=0.2, eps=1e-8)
    gate = GradientGate(rule=ours)
    for main, (aux,) in _vectors(15, 1, seed=3):
        gram = torch.stack([main, aux]) @ torch.stack([main, aux]).T
        target_before = ours.target.clone() if ours.target.numel() else torch.zeros(1, dtype=DT)
        w_theirs = theirs(gram)
        gate.combine(main, [aux])
        w_ours = torch.cat([1 + gradvac_coefficients(gram, target_before, eps=1e-8)[0], torch.ones(1, dtype=DT)])
        torch.testing.assert_close(w_ours[0], w_theirs[0], rtol=1e-12, atol=1e-12)
        swapped = gram.flip(0).flip(1)  # the auxiliary task as "main": torchjd's other correction
        c_reverse = gradvac_coefficients(swapped, target_before, eps=1e-8)[0]
        torch.testing.assert_close(w_theirs[1], 1 + c_reverse[0], rtol=1e-12, atol=1e-12)
        phi = theirs._phi_t
        torch.testing.assert_close(ours.target[0], phi[0, 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(phi[1, 0], phi[0, 1])


def test_gradvac_state_is_in_the_gate_state_dict_and_resumes_exactly():
    steps = _vectors(10, 2, seed=5)
    gate = make_gate("gradvac", beta=0.25)
    for main, aux in steps[:5]:
        gate.combine(main, aux)
    saved = copy.deepcopy(gate.state_dict())
    assert "rule.target" in saved and saved["rule.target"].shape == (2,)
    rest = [gate.combine(main, aux)[0] for main, aux in steps[5:]]
    fresh = make_gate("gradvac", beta=0.25)
    fresh.load_state_dict(saved)
    for (main, aux), want in zip(steps[5:], rest):
        assert torch.equal(fresh.combine(main, aux)[0], want)
    fresh.rule.reset()
    assert fresh.rule.target.numel() == 0 and int(fresh.rule.updates) == 0


def test_gradvac_non_finite_step_leaves_the_targets():
    gate = GradientGate(rule="gradvac")
    gate.combine(torch.tensor([1.0, 0.0], dtype=DT), [torch.tensor([-1.0, 1.0], dtype=DT)])
    before = gate.rule.target.clone()
    _, stats = gate.combine(torch.tensor([1.0, float("nan")], dtype=DT), [torch.tensor([-1.0, 1.0], dtype=DT)])
    assert not bool(stats.finite)
    assert torch.equal(gate.rule.target, before) and int(gate.rule.updates) == 1


def test_min_target_zero_keeps_proposition_1_and_the_paper_rule_does_not():
    steps = _vectors(40, 2, seed=1, shift=-1.5)  # mostly conflicting: the EMA targets go negative
    keep, paper = GradientGate(rule=GradVac(beta=0.2, min_target=0.0)), GradientGate(rule=GradVac(beta=0.2))
    assert keep.rule.keeps_main_descent() and not paper.rule.keeps_main_descent()
    assert not keep.rule.keeps_main_descent(per_layer=True)
    worst_keep = worst_paper = math.inf
    for main, aux in steps:
        for gate in (keep, paper):
            g, _ = gate.combine(main, aux)
            margin = float(g @ main - main @ main) / float(main @ main)
            if gate is keep:
                worst_keep = min(worst_keep, margin)
            else:
                worst_paper = min(worst_paper, margin)
    assert worst_keep >= -1e-12
    assert worst_paper < -0.05
    assert float(paper.rule.target.max()) < 0


def test_gradvac_options_and_per_tensor_needs_the_gate():
    assert get_rule("gradvac", beta=0.5).beta == 0.5
    gate = make_gate("gradvac", beta=0.1, min_target=0.0, aux_weight=0.5)
    assert (gate.rule.beta, gate.rule.min_target, gate.aux_weight) == (0.1, 0.0, 0.5)
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=0.0)
    with pytest.raises(NotImplementedError, match="per-tensor"):
        GradientGate(rule=GradVac(per_tensor=True)).combine(torch.ones(2), [torch.ones(2)])


def test_gradvac_coefficients_per_tensor_batch_equals_each_tensor_alone():
    """The coefficient function is batched: per-tensor Gramians (L, K, K) give each tensor's own correction."""
    steps = _vectors(3, 2, seed=9)
    grams = torch.stack([torch.stack([m] + a) @ torch.stack([m] + a).T for m, a in steps])
    target = torch.tensor([[0.1, -0.2], [0.3, 0.0], [0.5, 0.5]], dtype=DT)
    c, adjusted, cos = gradvac_coefficients(grams, target)
    for layer in range(3):
        c1, a1, cos1 = gradvac_coefficients(grams[layer], target[layer])
        torch.testing.assert_close(c[layer], c1)
        assert torch.equal(adjusted[layer], a1)


def test_a_skipped_step_leaves_the_targets_alone():
    # a NaN/inf only in a head's gradient: the Gramian on the trunk is finite, the step is skipped all the same
    from lightning_gradsim import GradientGate

    w, head = torch.nn.Parameter(torch.tensor([1.0, 0.5])), torch.nn.Parameter(torch.ones(1))
    gate = GradientGate(rule="gradvac")

    def step(poison: bool):
        w.grad = head.grad = None
        h = head * 1.0
        if poison:
            h.register_hook(lambda g: g * float("inf"))
        main = (w * torch.tensor([1.0, 0.0])).sum() + h.sum()
        return gate.backward(main, {"aux": (w * torch.tensor([-1.0, 1.0])).sum()}, [w])

    assert bool(step(False).finite)
    before = gate.rule.target.clone()
    assert not bool(step(True).finite)
    torch.testing.assert_close(gate.rule.target, before, rtol=0, atol=0)
    assert bool(step(False).finite) and not torch.equal(gate.rule.target, before)  # a finite step moves them
    gate.reset_state()
    assert gate.rule.target.numel() == 0
