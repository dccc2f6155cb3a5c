"""GradientGate.backward / combine against hand-computed gradients and an independent reference."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradsim import GradientGate


def reference_combination(rule, g_main, g_auxs, lam=1.0, threshold=0.0):
    """The README's formulas on flat vectors, written independently of the library."""
    out = g_main.clone()
    for g in g_auxs:
        nm, na = g_main.norm(), g.norm()
        cos = (g_main @ g) / (nm * na) if nm > 0 and na > 0 else torch.tensor(0.0, dtype=g.dtype)
        if rule == "unweighted":
            out += lam * g if cos >= threshold else 0 * g
        elif rule == "weighted":
            out += lam * max(float(cos), 0.0) * g if cos >= threshold else 0 * g
        elif rule == "projection":
            u = g_main / nm if nm > 0 else torch.zeros_like(g_main)
            out += lam * (g - min(float(g @ u), 0.0) * u)
        elif rule == "sum":
            out += lam * g
        elif rule == "main_only":
            pass
    return out


class TwoHeadNet(nn.Module):
    def __init__(self, n_aux=1):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
        self.main_head = nn.Linear(6, 3)
        self.aux_heads = nn.ModuleList(nn.Linear(6, 2) for _ in range(n_aux))

    def losses(self, x, x_aux=None):
        h = self.trunk(x)
        h_aux = h if x_aux is None else self.trunk(x_aux)
        main = self.main_head(h).pow(2).mean()
        aux = [(head(h_aux) - 1.0).pow(2).mean() * (i + 1) for i, head in enumerate(self.aux_heads)]
        return main, aux


def flat_grads(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])


def test_hand_computed_quadratic():
    # main 0.5|w - a|^2, aux 0.5|w - b|^2: g_main = w - a, g_aux = w - b.
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 0.0])
    gate = GradientGate(rule="unweighted", aux_weight=0.5)
    stats = gate.backward(0.5 * (w - a).pow(2).sum(), [0.5 * (w - b).pow(2).sum()], [w])
    # g_main = (1, 2), g_aux = (-2, 2): dot = 2 > 0 -> open: (1, 2) + 0.5 (-2, 2) = (0, 3)
    assert torch.allclose(w.grad, torch.tensor([0.0, 3.0]))
    assert stats.cosine.item() == pytest.approx(2 / (5**0.5 * 8**0.5))
    assert stats.main_norm.item() == pytest.approx(5**0.5)
    assert stats.aux_norm.tolist() == pytest.approx([8**0.5])
    # accumulates like Tensor.backward
    gate.backward(0.5 * (w - a).pow(2).sum(), [0.5 * (w - b).pow(2).sum()], [w])
    assert torch.allclose(w.grad, torch.tensor([0.0, 6.0]))


@pytest.mark.parametrize("rule", ["unweighted", "weighted", "projection", "sum", "main_only"])
@pytest.mark.parametrize("separate_batches", [False, True])
def test_backward_matches_reference_on_shared_and_heads(rule, separate_batches):
    torch.manual_seed(1)
    net = TwoHeadNet(n_aux=2).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    x_aux = torch.randn(8, 5, dtype=torch.float64) if separate_batches else None
    shared = list(net.trunk.parameters())
    main, aux = net.losses(x, x_aux)
    g_main = flat_grads(main, shared)
    g_aux = [flat_grads(a, shared) for a in aux]
    expected_shared = reference_combination(rule, g_main, g_aux, lam=0.7)
    expected_heads = {
        "main": torch.autograd.grad(main, list(net.main_head.parameters()), retain_graph=True),
        **{
            i: torch.autograd.grad(a, list(net.aux_heads[i].parameters()), retain_graph=True) for i, a in enumerate(aux)
        },
    }
    gate = GradientGate(rule=rule, aux_weight=0.7)
    gate.backward(main, {"a": aux[0], "b": aux[1]}, shared)  # heads found in the autograd graph
    got_shared = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got_shared, expected_shared, atol=1e-10)
    for p, g in zip(net.main_head.parameters(), expected_heads["main"]):
        assert torch.allclose(p.grad, g, atol=1e-12)
    for i in range(2):
        for p, g in zip(net.aux_heads[i].parameters(), expected_heads[i]):
            assert torch.allclose(p.grad, g, atol=1e-12)


def test_other_params_given_explicitly_and_frozen_params_ignored():
    net = TwoHeadNet()
    net.trunk[0].bias.requires_grad_(False)
    main, aux = net.losses(torch.randn(4, 5))
    others = list(net.main_head.parameters()) + list(net.aux_heads.parameters())
    GradientGate().backward(main, aux, net.trunk.parameters(), other_params=others)
    assert net.trunk[0].bias.grad is None
    assert all(p.grad is not None for p in others)
    assert net.trunk[0].weight.grad is not None


def test_aux_that_misses_a_shared_parameter_counts_as_zeros():
    w1, w2 = nn.Parameter(torch.tensor([1.0, 0.0])), nn.Parameter(torch.tensor([0.0, 1.0]))
    main = (w1.sum() + w2.sum()) ** 2 / 2  # grad on each: (w1+w2).sum() = 2 -> (2, 2) and (2, 2)
    aux = (w1 * torch.tensor([1.0, -1.0])).sum()  # reaches only w1: (1, -1) and zeros
    stats = GradientGate(rule="sum").backward(main, [aux], [w1, w2])
    assert torch.allclose(w1.grad, torch.tensor([3.0, 1.0]))
    assert torch.allclose(w2.grad, torch.tensor([2.0, 2.0]))
    assert stats.cosine.item() == pytest.approx(0.0)


def test_aux_reaching_no_shared_parameter_has_zero_cosine():
    w = nn.Parameter(torch.ones(2))
    head = nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="does not reach the shared parameters"):
        stats = GradientGate(rule="unweighted").backward(w.pow(2).sum(), [head.pow(2).sum()], [w])
    assert torch.allclose(w.grad, 2 * torch.ones(2)) and torch.allclose(head.grad, 2 * torch.ones(2))
    assert float(stats.cosine) == 0.0 and not bool(stats.measured) and not bool(stats.gate_open)


def test_clear_errors():
    w = nn.Parameter(torch.ones(3))
    gate = GradientGate()
    with pytest.raises(ValueError, match="scalar loss"):
        gate.backward(w * 2, [w.sum()], [w])
    with pytest.raises(ValueError, match="shared_params is empty"):
        gate.backward(w.sum(), [w.sum()], [])
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        gate.backward(w.sum(), [w.sum()], [frozen])
    other = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="main loss does not depend on any shared parameter"):
        gate.backward(other.sum(), [w.sum()], [w])
    with pytest.raises(ValueError, match="at least one"):
        gate.backward(w.sum(), [], [w])
    with pytest.raises(ValueError, match="does not require grad"):
        gate.backward(torch.tensor(1.0), [w.sum()], [w])
    with pytest.raises(ValueError, match="'main' names the main task"):
        GradientGate().backward(w.sum(), {"main": w.sum()}, [w])


def test_task_names_must_stay_the_same():
    w = nn.Parameter(torch.ones(3))
    gate = GradientGate()
    gate.backward(w.sum(), {"rot": w.sum()}, [w])
    with pytest.raises(ValueError, match="auxiliary tasks changed"):
        gate.backward(w.sum(), {"other": w.sum()}, [w])


def test_non_finite_step_reports_and_does_not_touch_state():
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    gate = GradientGate(rule="unweighted", cosine_ema=0.5, main_grad_ema=0.0)
    gate.backward(w.pow(2).sum(), [w.sum()], [w])
    state = copy.deepcopy(gate.state_dict())
    stats = gate.backward(w.pow(2).sum(), [w.sum() * float("nan")], [w])
    assert not bool(stats.finite)
    for key in ["cosine_state", "open_steps", "measured_steps"]:
        assert torch.equal(gate.state_dict()["state." + key], state["state." + key]), key
    assert gate.skipped_steps.item() == 1


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    t = lambda: [torch.randn(3, 2), torch.randn(4)]  # noqa: E731
    seq = [(t(), t(), t()) for _ in range(6)]
    gate = GradientGate(rule="projection", cosine_ema=0.8, main_grad_ema=0.9)
    for m, a, b in seq[:3]:
        gate.combine(m, {"a": a, "b": b})
    restored = GradientGate(rule="projection", cosine_ema=0.8, main_grad_ema=0.9)
    restored.load_state_dict(gate.state_dict())
    assert restored.aux_names == ["a", "b"]
    for m, a, b in seq[3:]:
        out1, s1 = gate.combine(m, {"a": a, "b": b})
        out2, s2 = restored.combine(m, {"a": a, "b": b})
        for x, y in zip(out1, out2):
            assert torch.equal(x, y)
        assert torch.equal(s1.smoothed_cosine, s2.smoothed_cosine)
    assert torch.equal(gate.open_steps, restored.open_steps)


def test_combine_batched_equals_a_loop_of_single_problems():
    torch.manual_seed(0)
    B = 5
    mains = [torch.randn(B, 3), torch.randn(B, 2, 2)]
    auxs = [torch.randn(B, 3), torch.randn(B, 2, 2)]
    for rule in ["unweighted", "weighted", "projection"]:
        batched = GradientGate(rule=rule, cosine_ema=0.5)
        singles = [GradientGate(rule=rule, cosine_ema=0.5) for _ in range(B)]
        for step in range(3):
            scale = 1.0 if step != 1 else -1.0
            out, st = batched.combine(mains, [[scale * a for a in auxs]], batch_dims=1)
            for i in range(B):
                o, s = singles[i].combine([m[i] for m in mains], [[scale * a[i] for a in auxs]])
                for ob, os_ in zip(out, o):
                    assert torch.allclose(ob[i], os_, atol=1e-6)
                assert torch.allclose(st.smoothed_cosine[i], s.smoothed_cosine, atol=1e-6)


def test_combine_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="must match tensor for tensor"):
        GradientGate().combine(torch.ones(3), [torch.ones(4)])


@settings(max_examples=60, deadline=None)
@given(
    rule=st.sampled_from(["unweighted", "weighted", "projection", "main_only"]),
    n_aux=st.integers(1, 3),
    dim=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    zero_main=st.booleans(),
    lam=st.floats(0.0, 5.0),
    threshold=st.floats(0.0, 0.9),
)
def test_proposition_1_combined_update_never_slows_the_main_task(rule, n_aux, dim, seed, zero_main, lam, threshold):
    """g . g_main >= |g_main|^2 for every rule but `sum` (Proposition 1 of the paper)."""
    gen = torch.Generator().manual_seed(seed)
    main = torch.randn(dim, generator=gen, dtype=torch.float64) * (0.0 if zero_main else 1.0)
    aux = [torch.randn(dim, generator=gen, dtype=torch.float64) * 3 for _ in range(n_aux)]
    out, _ = GradientGate(rule=rule, aux_weight=lam, threshold=threshold).combine(main, aux)
    assert float(out @ main) >= float(main @ main) - 1e-9 * (1 + float(main @ main))


def test_sum_rule_can_violate_proposition_1():
    main, aux = torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])
    out, _ = GradientGate(rule="sum").combine(main, [aux])
    assert float(out @ main) < float(main @ main)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(aux_weight=float("nan")), ValueError, "aux_weight must be a finite number >= 0, got nan"),
        (dict(aux_weight=float("inf")), ValueError, "aux_weight must be a finite number >= 0"),
        (dict(aux_weight=-0.5), ValueError, "aux_weight must be a finite number >= 0, got -0.5"),
        (dict(aux_weight={"rot": float("nan")}), ValueError, "aux_weight\\['rot'\\] must be a finite number"),
        (dict(aux_weight="1"), TypeError, "aux_weight must be a number"),
        (dict(threshold=1.5), ValueError, "threshold must be a cosine in \\[-1, 1\\], got 1.5"),
        (dict(threshold=-2.0), ValueError, "threshold must be a cosine in \\[-1, 1\\]"),
        (dict(seed=1.5), TypeError, "seed must be an integer, got 1.5"),
        (dict(seed="3"), TypeError, "seed must be an integer, got '3'"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientGate(**kwargs)


def test_a_nan_gradient_on_a_head_marks_the_step_non_finite():
    """A finite loss whose gradient is NaN only on a head (the trunk's is finite) is reported, on the
    path without transforms too, and the gate's state is left alone."""
    net = TwoHeadNet()
    gate = GradientGate(rule="unweighted", cosine_ema=0.5)
    main, aux = net.losses(torch.randn(4, 5))
    net.main_head.weight.register_hook(lambda g: g * float("nan"))
    stats = gate.backward(main, aux, net.trunk.parameters())
    assert not bool(stats.finite) and torch.isfinite(stats.main_norm)
    assert gate.skipped_steps.item() == 1 and gate.measured_steps.item() == 0
    assert torch.isfinite(net.trunk[0].weight.grad).all()
