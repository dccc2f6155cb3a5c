"""A skipped step leaves every piece of state alone under ``every_n_steps`` (issue 25, items 1-2): the
weights that the steps between two measured ones reuse come from the last *finite* measured step, so one
poisoned measured step is one skipped step, and no NaN reaches ``.grad`` on a step reported finite."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim import GradientGate


def _run(rule: str, every_n: int, ema: float, poison: int, steps: int = 12):
    w = torch.nn.Parameter(torch.tensor([0.3, -1.2, 0.8, 2.0]))
    gate = GradientGate(rule=rule, main_grad_ema=ema, every_n_steps=every_n, aux_weight=0.5)
    finite, grads_ok, reused_after = [], [], []
    for step in range(steps):
        w.grad = None
        aux = (w + 1).pow(2).sum() * (float("inf") if step == poison else 1.0)
        stats = gate.backward((w - 1).pow(2).sum(), {"aux": aux}, [w])
        finite.append(bool(stats.finite))
        grads_ok.append(bool(torch.isfinite(w.grad).all()))
        reused_after.append(None if gate.state.reuse is None else gate.state.reuse.weights.clone())
    return gate, finite, grads_ok, reused_after


def test_the_issues_reproduction_writes_no_nan_on_a_step_reported_finite():
    # projection with a main-gradient EMA, every 5 steps, an inf auxiliary loss on the measured step 5
    gate, finite, grads_ok, _ = _run("projection", 5, 0.9, poison=5, steps=7)
    assert finite == [True] * 5 + [False, True]
    assert grads_ok[6], "step 6 reuses weights and reports finite: its gradient must be finite"
    assert all(ok for ok, f in zip(grads_ok, finite) if f)


@pytest.mark.parametrize(
    "rule, ema",
    [("projection", 0.0), ("projection", 0.9), ("weighted", 0.0), ("pcgrad", 0.0), ("unweighted", 0.0), ("sum", 0.0)],
)
def test_one_poisoned_measured_step_is_one_skipped_step(rule, ema):
    gate, finite, grads_ok, reused = _run(rule, 5, ema, poison=5)
    assert finite.count(False) == 1 and not finite[5]
    assert int(gate.state.skipped_steps) == 1 and int(gate.state.step) == 12
    # steps 6-9 reuse the weights measured at step 0 (the last finite measured step), not step 5's
    for step in range(5, 10):
        torch.testing.assert_close(reused[step], reused[4], rtol=0, atol=0)
    assert torch.isfinite(reused[9]).all()
    assert int(gate.state.measured_steps) == 2  # steps 0 and 10 (step 5 was skipped)
    assert all(grads_ok[s] for s in range(12) if finite[s])


def test_a_poisoned_first_measured_step_is_measured_afresh_next_call():
    gate, finite, _, reused = _run("weighted", 5, 0.0, poison=0)
    assert finite[:2] == [False, True]
    assert reused[0] is None and reused[1] is not None  # nothing kept from step 0; step 1 measured
    assert int(gate.state.skipped_steps) == 1 and int(gate.state.measured_steps) >= 2


def test_an_auxiliary_loss_that_never_reaches_the_shared_parameters_is_not_measured_and_warned_once():
    trunk, head, aux_head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    gate = GradientGate(rule="unweighted")
    x = torch.randn(5, 3)
    with pytest.warns(UserWarning, match="'detached' does not reach the shared parameters") as caught:
        for _ in range(3):
            h = trunk(x)
            stats = gate.backward(head(h).pow(2).mean(), {"detached": aux_head(h.detach()).mean()}, trunk.parameters())
    assert sum("does not reach" in str(w.message) for w in caught) == 1  # once, not per step
    assert stats.measured.tolist() == [False] and stats.gate_open.tolist() == [False]
    assert float(gate.open_fraction()) == 0.0  # was reported open on 100% of steps
    assert aux_head.weight.grad is not None  # its own head still trains


def test_the_monitor_logs_an_unmeasured_task_as_not_measured_rather_than_open():
    from lightning_gradsim import GradSimMonitor

    gate = GradientGate(rule="unweighted")
    w = torch.nn.Parameter(torch.ones(2))
    _, stats = gate.combine([torch.tensor([1.0, 0.0])], {"a": [torch.tensor([1.0, 1.0])], "zero": [torch.zeros(2)]})
    metrics = GradSimMonitor.metrics_from(stats, gate)
    assert metrics["gradsim/measured/a"] == 1.0 and metrics["gradsim/gate_open/a"] == 1.0
    assert metrics["gradsim/measured/zero"] == 0.0
    assert not any(k.endswith("/zero") for k in metrics if k.split("/")[1] in ("cos", "gate_open", "weight"))
    del w


@pytest.mark.parametrize("similarity", ["parameters", "features"])
def test_a_skipped_pcgrad_step_draws_no_visiting_order(similarity):
    """PCGrad draws its visiting orders from the gate's generator; a skipped step must not advance it, or
    every later order (with two auxiliary tasks the order matters) differs from the run without that batch."""

    def run(poison: int | None, skip: int | None):
        torch.manual_seed(0)
        trunk, heads = torch.nn.Linear(3, 4), [torch.nn.Linear(4, 1) for _ in range(3)]
        gate = GradientGate(rule="pcgrad", similarity=similarity, seed=3)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            x, y = torch.randn(8, 3, generator=g), torch.randn(3, 8, 1, generator=g)
            if step == skip:
                continue
            for p in [*trunk.parameters(), *(q for h in heads for q in h.parameters())]:
                p.grad = None
            h = trunk(x)
            if similarity == "features":
                h = gate.mark_features(h)
            losses = [(head(h) - y[i]).pow(2).mean() for i, head in enumerate(heads)]
            if step == poison:
                losses[2] = losses[2] * float("nan")
            stats = gate.backward(losses[0], losses[1:], trunk.parameters())
            assert bool(stats.finite) == (step != poison)
        return gate.state.rng().get_state(), trunk.weight.grad.clone()

    poisoned_rng, poisoned_grad = run(poison=2, skip=None)
    ref_rng, ref_grad = run(poison=None, skip=2)
    assert torch.equal(poisoned_rng, ref_rng)  # two draws too many before the fix
    torch.testing.assert_close(poisoned_grad, ref_grad, rtol=0, atol=0)
