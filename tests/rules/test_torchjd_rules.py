"""torchjd weightings as gate rules: the gate's shared gradient equals torchjd's own
``mtl_backward`` + ``jac_to_grad`` (float64, a main and two auxiliary losses), names, state, randomness."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchjd", reason='torchjd is not installed: pip install -e ".[torchjd]"')
pytest.importorskip("qpsolvers", reason='torchjd\'s projector is not installed: pip install -e ".[torchjd]"')

import torchjd.aggregation as A
from torchjd.autojac import jac_to_grad, mtl_backward

from lightning_gradsim import GradientGate
from lightning_gradsim.methods import make_gate
from lightning_gradsim.rules import get_rule
from lightning_gradsim.rules.torchjd import TorchJDRule

from .._poison import PoisonGrad

torch.set_num_threads(1)
DT = torch.float64
LAMBDAS = (0.5, 2.0)

CASES = {
    "UPGrad": (lambda: A.UPGrad(), lambda: A.UPGradWeighting()),
    "MGDA": (lambda: A.MGDA(), lambda: A.MGDAWeighting()),
    "DualProj": (lambda: A.DualProj(), lambda: A.DualProjWeighting()),
    "IMTL-G": (lambda: A.IMTLG(), lambda: A.IMTLGWeighting()),
    "Aligned-MTL": (lambda: A.AlignedMTL(), lambda: A.AlignedMTLWeighting()),
    "Mean": (lambda: A.Mean(), lambda: A.MeanWeighting()),
    "CAGrad": (lambda: A.CAGrad(c=0.5), lambda: A.CAGradWeighting(c=0.5)),
}


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh()).double()
        self.heads = nn.ModuleList([nn.Linear(6, 1).double() for _ in range(3)])

    def forward(self, x, ys):
        h = self.trunk(x)
        return h, [((head(h) - y) ** 2).mean() for head, y in zip(self.heads, ys)]


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=DT)
    w = torch.randn(5, 1, generator=g, dtype=DT)
    # the auxiliary targets pull against the main one, so the task gradients conflict
    return x, [
        x @ w,
        -(x @ w) + 0.3 * torch.randn(16, 1, generator=g, dtype=DT),
        torch.randn(16, 1, generator=g, dtype=DT),
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_gate_equals_torchjd_mtl_backward_and_jac_to_grad(name):
    make_aggregator, make_weighting = CASES[name]
    x, ys = _data()
    ref = Net()
    h, losses = ref(x, ys)
    scaled = [losses[0]] + [lam * loss for lam, loss in zip(LAMBDAS, losses[1:])]
    mtl_backward(scaled, features=h)
    jac_to_grad(list(ref.trunk.parameters()), make_aggregator())

    ours = Net()
    gate = GradientGate(rule=make_weighting(), aux_weight={"a": LAMBDAS[0], "b": LAMBDAS[1]})
    _, losses = ours(x, ys)
    stats = gate.backward(losses[0], {"a": losses[1], "b": losses[2]}, ours.trunk.parameters())
    assert bool(stats.finite)
    cosines = stats.cosine.tolist()
    assert min(cosines) < 0  # a real conflict for the weightings to resolve
    for (pname, p), q in zip(ours.trunk.named_parameters(), ref.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-10, msg=f"{name}: {pname}")
    # heads: their own task's gradient (torchjd's heads get the gradient of the lambda-scaled loss)
    for i, head in enumerate(ours.heads):
        scale = 1.0 if i == 0 else LAMBDAS[i - 1]
        for p, q in zip(head.parameters(), ref.heads[i].parameters()):
            torch.testing.assert_close(p.grad, q.grad / scale, rtol=1e-9, atol=1e-12)
    # and the weighting did something: the shared gradient is not the lambda-weighted sum
    summed = Net()
    _, losses = summed(x, ys)
    sum(lam * loss for lam, loss in zip((1.0,) + LAMBDAS, losses)).backward()
    gap = max(float((p.grad - q.grad).abs().max()) for p, q in zip(ours.trunk.parameters(), summed.trunk.parameters()))
    assert gap > 1e-3, name


def test_names_resolve_to_default_weightings_and_options_pass_on():
    gate = make_gate("torchjd:UPGrad", aux_weight=0.5)
    assert isinstance(gate.rule, TorchJDRule) and isinstance(gate.rule.weighting, A.UPGradWeighting)
    assert gate.rule_name == "torchjd:UPGrad" and gate.aux_weight == 0.5
    assert make_gate("torchjd:CAGrad", c=0.25).rule.weighting.c == 0.25
    assert isinstance(get_rule("torchjd:IMTL-G").weighting, A.IMTLGWeighting)
    assert isinstance(GradientGate(rule=A.MGDAWeighting()).rule, TorchJDRule)
    with pytest.raises(TypeError, match="needs options"):
        make_gate("torchjd:CAGrad")
    with pytest.raises(ValueError, match="no weighting 'Nope'"):
        make_gate("torchjd:Nope")
    with pytest.raises(ValueError, match="reads the Jacobian itself"):
        GradientGate(rule=A.ExcessMTLWeighting())


def test_missing_torchjd_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    with pytest.raises(ImportError, match=r"lightning-gradsim\[torchjd\]"):
        get_rule("torchjd:UPGrad")


def _steps(n: int, seed: int = 0, k: int = 3, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(dim, generator=g, dtype=DT), [torch.randn(dim, generator=g, dtype=DT) for _ in range(k - 1)])
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", ["torchjd:GradVac", "torchjd:NashMTL"])
def test_stateful_weighting_state_is_in_the_gate_state_dict_and_resumes_exactly(name):
    pytest.importorskip("cvxpy", reason='Nash-MTL needs cvxpy: pip install -e ".[torchjd]"')
    steps = _steps(8)
    gate = make_gate(name)
    for main, aux in steps[:4]:
        gate.combine(main, aux)
    saved = copy.deepcopy(gate.state_dict())
    rest = [gate.combine(main, aux)[0] for main, aux in steps[4:]]
    fresh = make_gate(name)
    fresh.load_state_dict(saved)
    for (main, aux), want in zip(steps[4:], rest):
        torch.testing.assert_close(fresh.combine(main, aux)[0], want, rtol=1e-9, atol=1e-12)
    if name == "torchjd:GradVac":
        assert "rule.weighting._phi_t" in saved
        restarted = make_gate(name)  # without the state, the targets start at 0 again: another result
        assert not torch.allclose(restarted.combine(*steps[4])[0], rest[0])


def test_random_weightings_are_seeded_by_the_gate_and_leave_the_global_generator():
    steps = _steps(3, seed=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [make_gate("torchjd:Random", seed=4).combine(m, x)[0] for m, x in steps[:1]]
    b = [make_gate("torchjd:Random", seed=4).combine(m, x)[0] for m, x in steps[:1]]
    c = [make_gate("torchjd:Random", seed=5).combine(m, x)[0] for m, x in steps[:1]]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_a_batch_of_problems_runs_the_weighting_per_problem():
    steps = _steps(4, seed=3)
    mains = torch.stack([m for m, _ in steps])
    auxes = [torch.stack([x[k] for _, x in steps]) for k in range(2)]
    batched, _ = make_gate("torchjd:UPGrad", aux_weight=0.5).combine(mains, auxes, batch_dims=1)
    for i, (m, x) in enumerate(steps):
        alone, _ = make_gate("torchjd:UPGrad", aux_weight=0.5).combine(m, x)
        torch.testing.assert_close(batched[i], alone)
    with pytest.raises(ValueError, match="keeps state"):
        make_gate("torchjd:GradVac").combine(mains, auxes, batch_dims=1)


@pytest.mark.parametrize("name", ["torchjd:GradVac", "torchjd:NashMTL"])
@pytest.mark.parametrize("poison", [0, 3])  # the first step (Nash-MTL builds its problem on it) or a later one
def test_a_skipped_step_leaves_a_stateful_weightings_state_as_without_that_step(name, poison):
    """A NaN auxiliary vector skips the step: the weighting's state (GradVac's EMA targets, Nash-MTL's step
    count and previous weights) must be that of the run without the step, and so must every later result
    (torchjd's GradVac would otherwise keep the NaN in its targets for good)."""
    pytest.importorskip("cvxpy", reason='Nash-MTL needs cvxpy: pip install -e ".[torchjd]"')
    steps = _steps(7, seed=5)
    poisoned, reference = make_gate(name), make_gate(name)
    got, want = [], []
    for i, (main, aux) in enumerate(steps):
        if i == poison:
            _, stats = poisoned.combine(main, [aux[0] * float("nan"), aux[1]])
            assert not bool(stats.finite)
            continue
        got.append(poisoned.combine(main, aux)[0])
        want.append(reference.combine(main, aux)[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mine, theirs = poisoned.state_dict(), reference.state_dict()
    assert int(mine["state.skipped_steps"]) == 1
    rule_keys = [k for k in theirs if k.startswith("rule.") and isinstance(theirs[k], torch.Tensor)]
    assert rule_keys == [k for k in mine if k.startswith("rule.") and isinstance(mine[k], torch.Tensor)]
    for key in rule_keys:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
    assert repr(mine["rule._extra_state"]) == repr(theirs["rule._extra_state"])


@pytest.mark.parametrize("name", ["torchjd:GradVac", "torchjd:NashMTL"])
def test_a_step_skipped_after_the_weighting_ran_puts_its_state_back(name):
    """The Gramian is finite, so the weighting runs and moves its state, but an auxiliary head's gradient is
    NaN: the step is skipped, and the weighting's state must be that of the run without the batch."""
    pytest.importorskip("cvxpy", reason='Nash-MTL needs cvxpy: pip install -e ".[torchjd]"')

    def run(poison: int | None, skip: int | None):
        net, gate = Net(), make_gate(name)
        g = torch.Generator().manual_seed(3)
        grads = []
        for step in range(5):
            x, ys = torch.randn(16, 5, generator=g, dtype=DT), torch.randn(3, 16, 1, generator=g, dtype=DT)
            if step == skip:
                continue
            net.zero_grad(set_to_none=True)
            h = net.trunk(x)
            head = net.heads[1]  # its weight's gradient is NaN, the trunk's is not
            aux = nn.functional.linear(h, PoisonGrad.apply(head.weight, step == poison), head.bias)
            losses = [((net.heads[0](h) - ys[0]) ** 2).mean(), ((aux - ys[1]) ** 2).mean()]
            losses.append(((net.heads[2](h) - ys[2]) ** 2).mean())
            stats = gate.backward(losses[0], losses[1:], net.trunk.parameters(), net.heads.parameters())
            assert bool(stats.finite) == (step != poison)
            if step != poison:
                grads.append([p.grad.clone() for p in net.trunk.parameters()])
        return gate.state_dict(), grads

    for poison in (0, 2):
        (mine, got), (theirs, want) = run(poison, None), run(None, poison)
        for a, b in zip(got, want):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        keys = [k for k in theirs if k.startswith("rule.") and isinstance(theirs[k], torch.Tensor)]
        for key in keys:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
        assert repr(mine["rule._extra_state"]) == repr(theirs["rule._extra_state"])
