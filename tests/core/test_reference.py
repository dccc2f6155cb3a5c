"""A held-out reference gradient (issue 23): ``gate.backward(..., reference_loss=ref)`` measures each auxiliary
cosine, and so the decision, against ``grad(ref)`` on the shared parameters, while the update stays
``g_main + sum_k w_k g_k`` and the reference touches no ``.grad``. Hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradsim import GradientGate

G_MAIN = torch.tensor([1.0, 2.0])
G_AUX = torch.tensor([1.0, 0.5])  # agrees with the training main gradient: dot 2 > 0
G_REF = torch.tensor([-1.0, 0.2])  # conflicts with the auxiliary one: dot -0.9 < 0


def _losses(w: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (w * G_MAIN).sum(), (w * G_AUX).sum(), (w * G_REF).sum()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_agreeing_with_the_training_gradient_but_conflicting_with_the_held_out_one_closes_the_gate():
    w = nn.Parameter(torch.zeros(2))
    main, aux, ref = _losses(w)
    stats = GradientGate(rule="unweighted").backward(main, {"aux": aux}, [w], reference_loss=ref)
    assert torch.equal(w.grad, G_MAIN)  # exactly g_main
    assert stats.gate_open.tolist() == [False] and stats.against_reference
    assert float(stats.cosine) == pytest.approx(_cos(G_REF, G_AUX), abs=1e-6)
    assert float(stats.main_norm) == pytest.approx(float(G_MAIN.norm()), abs=1e-6)  # the training main norm
    # the same step measured against the training gradient keeps the gate open
    w.grad = None
    main, aux, _ = _losses(w)
    GradientGate(rule="unweighted").backward(main, {"aux": aux}, [w])
    assert torch.equal(w.grad, G_MAIN + G_AUX)


def test_weighted_scales_by_the_cosine_with_the_reference():
    w = nn.Parameter(torch.zeros(2))
    ref_dir = torch.tensor([1.0, 1.0])
    main, aux = (w * G_MAIN).sum(), (w * G_AUX).sum()
    stats = GradientGate(rule="weighted", aux_weight=0.5).backward(
        main, {"aux": aux}, [w], reference_loss=(w * ref_dir).sum()
    )
    c = _cos(ref_dir, G_AUX)
    torch.testing.assert_close(w.grad, G_MAIN + 0.5 * c * G_AUX)
    assert float(stats.weight) == pytest.approx(0.5 * c, abs=1e-6)


def test_projection_projects_onto_the_reference_direction():
    w = nn.Parameter(torch.zeros(2))
    main, aux, ref = _losses(w)
    GradientGate(rule="projection").backward(main, {"aux": aux}, [w], reference_loss=ref)
    u = G_REF / G_REF.norm()
    expected = G_MAIN + G_AUX - min(0.0, float(G_AUX @ u)) * u
    torch.testing.assert_close(w.grad, expected)


def test_the_reference_gradient_touches_no_grad_of_the_heads():
    torch.manual_seed(0)
    trunk, head, aux_head = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    x, x_ref = torch.randn(6, 3), torch.randn(5, 3)
    h = trunk(x)
    main, aux = head(h).pow(2).mean(), aux_head(h).mean()
    ref = head(trunk(x_ref)).pow(2).mean()  # the main head on the held-out batch
    expected_head = torch.autograd.grad(main, head.weight, retain_graph=True)[0]
    GradientGate(rule="sum").backward(main, {"aux": aux}, trunk.parameters(), reference_loss=ref)
    torch.testing.assert_close(head.weight.grad, expected_head)
    # and the trunk got g_main + g_aux (sum), nothing of the reference
    trunk2 = nn.Linear(3, 4)
    trunk2.load_state_dict(trunk.state_dict())
    h2 = trunk2(x)
    (head(h2).pow(2).mean() + aux_head(h2).mean()).backward()
    torch.testing.assert_close(trunk.weight.grad, trunk2.weight.grad)


def test_combine_with_a_reference_vector_equals_backward_with_a_reference_loss():
    gate = GradientGate(rule="weighted")
    update, stats = gate.combine(G_MAIN, {"aux": torch.tensor([1.0, 1.0])}, reference=torch.tensor([0.2, 1.0]))
    c = _cos(torch.tensor([0.2, 1.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(update, G_MAIN + c * torch.tensor([1.0, 1.0]))
    assert stats.against_reference and float(stats.cosine) == pytest.approx(c, abs=1e-6)


def test_the_reference_costs_one_backward_on_measured_steps_only():
    w = nn.Parameter(torch.zeros(2))
    gate = GradientGate(rule="unweighted", every_n_steps=3)
    calls = []
    for _ in range(6):
        w.grad = None
        main, aux, ref = _losses(w)
        ref = ref + 0 * w.sum()
        ref.register_hook(lambda g: calls.append(1))
        gate.backward(main, {"aux": aux}, [w], reference_loss=ref)
        assert torch.isfinite(w.grad).all()
    assert len(calls) == 2  # steps 0 and 3
    assert int(gate.state.measured_steps) == 2


def test_a_reference_that_misses_the_shared_parameters_or_is_not_a_scalar_is_refused():
    w, other = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    main, aux, _ = _losses(w)
    with pytest.raises(ValueError, match="reference_loss does not depend on any shared parameter"):
        GradientGate().backward(main, {"aux": aux}, [w], reference_loss=other.sum())
    with pytest.raises(TypeError, match="reference_loss must be a scalar tensor"):
        GradientGate().backward(main, {"aux": aux}, [w], reference_loss=w * 2)
    with pytest.raises(ValueError, match="similarity='parameters'"):
        GradientGate(similarity="features").backward(main, {"aux": aux}, [w], reference_loss=(w * G_REF).sum())


def test_the_running_mean_and_standard_error_of_the_cosine():
    # a fixed conflict: every step's cosine is the same, so the mean is it and the spread is 0
    w = nn.Parameter(torch.zeros(2))
    gate = GradientGate(rule="unweighted")
    for _ in range(60):
        w.grad = None
        main, aux, ref = _losses(w)
        gate.backward(main, {"aux": aux}, [w], reference_loss=ref)
    mean, se, noise = gate.state.cosine_summary()
    assert float(mean) == pytest.approx(_cos(G_REF, G_AUX), abs=1e-6)
    assert float(se) == pytest.approx(0.0, abs=1e-9)
    assert float(noise) == pytest.approx(1 / 60)  # only the first step, with no estimate yet
    assert math.isfinite(float(se))


def test_the_standard_error_uses_batch_means_once_two_windows_are_complete():
    from lightning_gradsim.core.cosine_stats import N_MOMENTS, WINDOW, summarize, update_moments

    m = torch.zeros(1, N_MOMENTS, dtype=torch.float64)
    cosines = [0.1] * WINDOW + [0.3] * WINDOW  # window means 0.1 and 0.3
    for c in cosines:
        m = update_moments(m, torch.tensor([c]), torch.tensor([True]), torch.tensor([c]), threshold=0.0)
    mean, se, _ = summarize(m)
    assert float(mean) == pytest.approx(0.2)
    # sd of the window means sqrt(((0.1-0.2)^2 + (0.3-0.2)^2) / 1) = 0.1414, over sqrt(2 windows)
    assert float(se) == pytest.approx(0.1, rel=1e-6)  # the cosines were float32
    naive = torch.tensor(cosines, dtype=torch.float64).std() / math.sqrt(len(cosines))
    assert float(se) > 3 * float(naive)  # the naive SE ignores that consecutive cosines move together
    # unmeasured or non-finite steps do not count
    m2 = update_moments(m, torch.tensor([0.9]), torch.tensor([False]), torch.tensor([0.9]), threshold=0.0)
    torch.testing.assert_close(m2, m)
