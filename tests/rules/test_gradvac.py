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


def _moved(g, main, t, eps=0.0):
    """The paper's move of ``g`` toward ``main`` when their cosine is below the target ``t``: ``(moved, cos)``."""
    cos = float(g @ main / (g.norm() * main.norm() + eps))
    if cos >= t:
        return g, cos
    coef = g.norm() * (t * math.sqrt(1 - cos**2) - cos * math.sqrt(1 - t**2))
    moved = g + coef / (main.norm() * math.sqrt(1 - t**2) + eps) * main
    # independent check of the formula: the moved vector's cosine with main is the target
    assert float(moved @ main / (moved.norm() * main.norm())) == pytest.approx(t, abs=1e-12)
    return moved, cos


def _reference(steps, beta, lam, eps=0.0, min_target=None):
    """The paper's update on explicit vectors: g_k moved toward g_main when cos < target; EMA every step."""
    targets = [0.0] * len(steps[0][1])
    outs, adjusted_any = [], False
    for main, auxes in steps:
        out = main.clone()
        for k, g in enumerate(auxes):
            t = targets[k] if min_target is None else max(targets[k], min_target)
            moved, cos = _moved(g, main, t, eps)
            adjusted_any |= moved is not g
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
    for kwargs in ({"similarity": "features"}, {"every_n_steps": 2}):
        with pytest.raises(ValueError, match="weighs each shared tensor on its own"):
            GradientGate(rule=GradVac(per_tensor=True), **kwargs)
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="reference_loss is not supported"):
        GradientGate(rule=GradVac(per_tensor=True)).backward(w.sum(), [w.prod()], [w], reference_loss=2 * w.sum())


def _per_tensor_reference(layers, beta, lam, targets):
    """GradVac per tensor on explicit per-tensor vectors: each tensor's auxiliary pieces moved toward its main
    piece with that tensor's own target; returns the update per tensor and the new targets."""
    out, new = [], [list(t) for t in targets]
    for li, (main, auxes) in enumerate(layers):
        acc = main.clone()
        for k, g in enumerate(auxes):
            moved, cos = _moved(g, main, targets[li][k])
            acc = acc + lam[k] * moved
            new[li][k] = (1 - beta) * targets[li][k] + beta * cos
        out.append(acc)
    return out, new


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.heads = nn.ModuleList([nn.Linear(3, 1) for _ in range(3)])

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        return [head(h).squeeze(-1) for head in self.heads]


def _losses(net, x, y):
    return [((o - y[:, k]) ** 2).mean() for k, o in enumerate(net(x))]


@pytest.mark.parametrize("layout", ["sequential", "batched"])
def test_gradvac_per_tensor_equals_the_per_tensor_update_over_steps(layout):
    """Each shared tensor gets its own targets and its own main weight; heads get their own task's gradient."""
    torch.manual_seed(3)
    net = _Trunk().double()
    shared = [*net.a.parameters(), *net.b.parameters()]
    gate = GradientGate(rule=GradVac(beta=0.3, per_tensor=True), aux_weight={"x": 0.5, "y": 2.0})
    gate.grad_strategy = layout
    lam = [0.5, 2.0]
    targets = [[0.0, 0.0] for _ in shared]
    g = torch.Generator().manual_seed(0)
    adjusted_some = opened_some = False
    for _ in range(8):
        x, y = torch.randn(16, 4, generator=g, dtype=DT), torch.randn(16, 3, generator=g, dtype=DT)
        y[:, 2] = -y[:, 0] + 0.3 * y[:, 2]  # "y" leans against the main task
        losses = _losses(net, x, y)
        per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
        heads_want = [
            torch.autograd.grad(losses[k], list(net.heads[k].parameters()), retain_graph=True) for k in range(3)
        ]
        layers = [
            (per_task[0][i].flatten(), [per_task[1][i].flatten(), per_task[2][i].flatten()]) for i in range(len(shared))
        ]
        want, targets = _per_tensor_reference(layers, 0.3, lam, targets)
        net.zero_grad(set_to_none=True)
        stats = gate.backward(losses[0], {"x": losses[1], "y": losses[2]}, shared, net.heads.parameters())
        for p, w in zip(shared, want):
            torch.testing.assert_close(p.grad.flatten(), w, rtol=1e-12, atol=1e-12)
        for k in range(3):
            for p, w in zip(net.heads[k].parameters(), heads_want[k]):
                torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(gate.rule.target, torch.tensor(targets, dtype=DT), rtol=1e-12, atol=1e-12)
        assert gate.rule.target.shape == (len(shared), 2)
        torch.testing.assert_close(stats.weight, torch.tensor(lam, dtype=stats.weight.dtype))  # the mean over tensors
        adjusted_some |= not bool(stats.gate_open.all())
        opened_some |= bool(stats.gate_open.any())
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.05 * p.grad
    assert adjusted_some and opened_some


def test_gradvac_per_tensor_with_one_tensor_is_the_whole_trunk_rule_and_stacked_runs_are_independent():
    steps = _vectors(10, 2, seed=4)
    whole, per = GradientGate(rule=GradVac(beta=0.2)), GradientGate(rule=GradVac(beta=0.2, per_tensor=True))
    for main, aux in steps:
        torch.testing.assert_close(per.combine(main, aux)[0], whole.combine(main, aux)[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(per.rule.target[0], whole.rule.target)
    # three stacked runs (batch_dims=1) of two tensors each == each run alone
    g = torch.Generator().manual_seed(1)
    mains = [torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 2, 2, generator=g, dtype=DT)]
    auxes = [[-m + 0.5 * torch.randn(m.shape, generator=g, dtype=DT) for m in mains]]
    stacked = GradientGate(rule=GradVac(beta=0.5, per_tensor=True))
    both, _ = stacked.combine(mains, auxes, batch_dims=1)
    for r in range(3):
        alone = GradientGate(rule=GradVac(beta=0.5, per_tensor=True))
        got, _ = alone.combine([m[r] for m in mains], [[a[r] for a in auxes[0]]])
        for b, a in zip(both, got):
            torch.testing.assert_close(b[r], a, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(stacked.rule.target[:, r], alone.rule.target)


def test_gradvac_per_tensor_resumes_exactly_and_a_skipped_step_leaves_its_targets():
    layers = [_vectors(12, 1, dim=3, seed=s) for s in (1, 2)]  # two tensors
    steps = [([a[0], b[0]], [[a[1][0], b[1][0]]]) for a, b in zip(*layers)]
    gate = GradientGate(rule=GradVac(beta=0.25, per_tensor=True))
    for main, aux in steps[:6]:
        gate.combine(main, aux)
    saved = copy.deepcopy(gate.state_dict())
    assert saved["rule.target"].shape == (2, 1)
    rest = [gate.combine(main, aux)[0] for main, aux in steps[6:]]
    fresh = GradientGate(rule=GradVac(beta=0.25, per_tensor=True))
    fresh.load_state_dict(saved)
    for (main, aux), want in zip(steps[6:], rest):
        got = fresh.combine(main, aux)[0]
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    before = fresh.rule.target.clone()
    bad = [steps[0][0][0], torch.full((3,), float("nan"), dtype=DT)]  # NaN in the second tensor only
    _, stats = fresh.combine(bad, steps[0][1])
    assert not bool(stats.finite) and torch.equal(fresh.rule.target, before)


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
