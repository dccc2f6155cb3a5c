"""Each rule's coefficients against values computed by hand from the formulas in the README."""

import math

import pytest
import torch

from lightning_gradsim import GradientGate, Rule, RuleInput, get_rule, list_rules, register_rule


def combine(rule, g_main, g_aux, **kw):
    gate = GradientGate(rule=rule, **kw)
    out, stats = gate.combine(torch.tensor(g_main, dtype=torch.float64), [torch.tensor(g_aux, dtype=torch.float64)])
    return out, stats


G_MAIN = [1.0, 0.0]
AGREE = [1.0, 1.0]  # cos = 1/sqrt(2)
CONFLICT = [-1.0, 1.0]  # cos = -1/sqrt(2)


def test_unweighted_adds_aux_iff_cosine_above_threshold():
    out, st = combine("unweighted", G_MAIN, AGREE, aux_weight=0.5)
    assert torch.allclose(out, torch.tensor([1.5, 0.5], dtype=torch.float64))
    assert st.cosine.item() == pytest.approx(1 / math.sqrt(2))
    assert st.gate_open.tolist() == [True]
    out, st = combine("unweighted", G_MAIN, CONFLICT, aux_weight=0.5)
    assert torch.allclose(out, torch.tensor(G_MAIN, dtype=torch.float64))
    assert st.weight.item() == 0.0 and st.gate_open.tolist() == [False]
    # a threshold above the cosine closes the gate
    out, _ = combine("unweighted", G_MAIN, AGREE, threshold=0.8)
    assert torch.allclose(out, torch.tensor(G_MAIN, dtype=torch.float64))


def test_weighted_scales_by_positive_cosine():
    out, st = combine("weighted", G_MAIN, AGREE, aux_weight=2.0)
    c = 1 / math.sqrt(2)
    assert torch.allclose(out, torch.tensor([1 + 2 * c, 2 * c], dtype=torch.float64))
    assert st.weight.item() == pytest.approx(2 * c)
    out, _ = combine("weighted", G_MAIN, CONFLICT, aux_weight=2.0)
    assert torch.allclose(out, torch.tensor(G_MAIN, dtype=torch.float64))


def test_projection_removes_only_the_conflicting_component():
    # g_aux = (-1, 1), u = (1, 0): g_aux . u = -1 < 0, so g_aux - (-1) u = (0, 1).
    out, st = combine("projection", [2.0, 0.0], CONFLICT, aux_weight=1.0)
    assert torch.allclose(out, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert st.gate_open.tolist() == [False]
    # agreeing aux is added unchanged
    out, st = combine("projection", [2.0, 0.0], AGREE, aux_weight=0.5)
    assert torch.allclose(out, torch.tensor([2.5, 0.5], dtype=torch.float64))
    assert st.gate_open.tolist() == [True]


def test_projection_with_main_gradient_ema_uses_the_ema_direction():
    gate = GradientGate(rule="projection", main_grad_ema=0.5)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out, _ = gate.combine(t([1.0, 0.0]), [t([0.0, 1.0])])  # d_0 = (1, 0): no conflict
    assert torch.allclose(out, t([1.0, 1.0]))
    # step 2: g_main = (0, 1), d_1 = 0.5 (1,0) + 0.5 (0,1) = (0.5, 0.5); g_aux = (-1, 0): g_aux.d = -0.5
    # g_aux - (g_aux.d / |d|^2) d = (-1, 0) - (-0.5 / 0.5) (0.5, 0.5) = (-0.5, 0.5)
    out, _ = gate.combine(t([0.0, 1.0]), [t([-1.0, 0.0])])
    assert torch.allclose(out, t([-0.5, 1.5]))
    assert torch.allclose(gate.main_grad_ema_0, t([0.5, 0.5]))


def test_sum_and_main_only():
    out, st = combine("sum", G_MAIN, CONFLICT, aux_weight=0.5)
    assert torch.allclose(out, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert st.gate_open.tolist() == [True]
    out, st = combine("main_only", G_MAIN, AGREE)
    assert torch.allclose(out, torch.tensor(G_MAIN, dtype=torch.float64))
    assert st.gate_open.tolist() == [False]


def test_each_auxiliary_task_is_gated_on_its_own_with_its_own_weight():
    gate = GradientGate(rule="unweighted", aux_weight={"a": 0.5, "b": 2.0})
    main = torch.tensor([1.0, 0.0])
    out, st = gate.combine(main, {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([-1.0, 3.0])})
    assert st.gate_open.tolist() == [True, False]
    assert torch.allclose(out, torch.tensor([1.5, 0.5]))
    with pytest.raises(ValueError, match="one weight per auxiliary task"):
        GradientGate(aux_weight={"a": 1.0}).combine(main, {"b": main})


def test_cosine_ema_smooths_the_cosine_the_rule_uses():
    gate = GradientGate(rule="unweighted", cosine_ema=0.9)
    t = torch.tensor
    _, st = gate.combine(t([1.0, 0.0]), [t([1.0, 0.0])])  # cos 1, s_0 = 1
    assert st.smoothed_cosine.item() == pytest.approx(1.0)
    _, st = gate.combine(t([1.0, 0.0]), [t([-1.0, 0.0])])  # cos -1: s = 0.9 - 0.1 = 0.8: still open
    assert st.cosine.item() == pytest.approx(-1.0)
    assert st.smoothed_cosine.item() == pytest.approx(0.8)
    assert st.gate_open.tolist() == [True]
    assert gate.open_fraction().item() == pytest.approx(1.0)


def test_per_layer_cosine_is_the_mean_over_tensors_with_gradient():
    t = torch.tensor
    main = [t([1.0, 0.0]), t([1.0]), t([0.0, 0.0])]
    aux = [t([1.0, 1.0]), t([-2.0]), t([1.0, 1.0])]
    gate = GradientGate(rule="unweighted", per_layer=True)
    _, st = gate.combine(main, [aux])
    # layer 1: 1/sqrt(2); layer 2: -1; layer 3: main is zero, so it does not count.
    assert st.cosine.item() == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    _, st_global = GradientGate(rule="unweighted").combine(main, [aux])
    # global: dot = 1 - 2 = -1, |main| = sqrt(2), |aux| = sqrt(2 + 4 + 2)
    assert st_global.cosine.item() == pytest.approx(-1 / (math.sqrt(2) * math.sqrt(8)))


def test_zero_main_gradient_gives_zero_cosine_and_no_nan():
    for rule in ["unweighted", "weighted", "projection"]:
        out, st = combine(rule, [0.0, 0.0], [1.0, 2.0])
        assert st.cosine.item() == 0.0
        assert torch.isfinite(out).all()
    out, st = combine("unweighted", [0.0, 0.0], [1.0, 2.0])  # cos 0 >= threshold 0: gate open
    assert torch.allclose(out, torch.tensor([1.0, 2.0], dtype=torch.float64))
    out, _ = combine("projection", [0.0, 0.0], [1.0, 2.0])  # no direction: nothing removed
    assert torch.allclose(out, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_user_rule_can_be_registered_and_used_by_name():
    @register_rule("test_half_when_conflicting")
    class HalfWhenConflicting(Rule):
        def weights(self, inp: RuleInput) -> torch.Tensor:
            return inp.with_main(inp.aux_weight * torch.where(inp.cosine >= 0, 1.0, 0.5))

    assert "test_half_when_conflicting" in list_rules()
    out, _ = combine("test_half_when_conflicting", G_MAIN, CONFLICT)
    assert torch.allclose(out, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert isinstance(get_rule("test_half_when_conflicting"), HalfWhenConflicting)
    with pytest.raises(ValueError, match="already registered"):
        register_rule("test_half_when_conflicting")(HalfWhenConflicting)
    # an instance works too, without registration
    out, _ = GradientGate(rule=HalfWhenConflicting()).combine(torch.tensor(G_MAIN), [torch.tensor(CONFLICT)])
    assert torch.allclose(out, torch.tensor([0.5, 0.5]))


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="Registered rules: .*unweighted"):
        GradientGate(rule="nope")
