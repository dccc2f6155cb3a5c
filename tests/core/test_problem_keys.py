"""Keyed problems (``gate.combine(..., batch_dims=1, problem_keys=...)``): a random rule draws each problem's
numbers from its own stream, so a problem of a batch gets what it gets alone (stacked runs need it), a resumed
gate draws on, and a skipped step draws again."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim import GradientGate
from lightning_gradsim.loss_weighting import RLW
from lightning_gradsim.methods import make_gate

DT = torch.float64
RULES = ["pcgrad", "torchjd:Random"]


def _gate(rule: str) -> GradientGate:
    if rule.startswith("torchjd:"):
        pytest.importorskip("torchjd", reason='torchjd is not installed: pip install -e ".[torchjd]"')
    return make_gate(rule, seed=3)


def _vectors(step: int, problems: int = 3, aux: int = 3, dim: int = 6):
    """Auxiliary vectors that pull against the main one and each other: PCGrad's visiting order matters."""
    g = torch.Generator().manual_seed(100 + step)
    main = torch.randn(problems, dim, generator=g, dtype=DT)
    return main, [-0.5 * main + torch.randn(problems, dim, generator=g, dtype=DT) for _ in range(aux)]


@pytest.mark.parametrize("rule", RULES)
def test_a_keyed_problem_gets_what_it_gets_alone(rule):
    keys = [11, 4, 7]
    batched, alone = _gate(rule), [_gate(rule) for _ in keys]
    unkeyed, unkeyed_alone = _gate(rule), [_gate(rule) for _ in keys]
    moved = 0
    for step in range(6):
        main, aux = _vectors(step)
        together, _ = batched.combine(main, aux, batch_dims=1, problem_keys=keys)
        plain, _ = unkeyed.combine(main, aux, batch_dims=1)
        for b, key in enumerate(keys):
            one = [a[b : b + 1] for a in aux]
            by_itself, _ = alone[b].combine(main[b : b + 1], one, batch_dims=1, problem_keys=[key])
            torch.testing.assert_close(together[b], by_itself[0])
            plain_alone, _ = unkeyed_alone[b].combine(main[b : b + 1], one, batch_dims=1)
            moved += not torch.allclose(plain[b], plain_alone[0])
    assert moved > 0  # not vacuous: without keys a problem's draws follow its place in the batch


@pytest.mark.parametrize("rule", RULES)
def test_keyed_draws_resume_and_a_skipped_step_draws_again(rule):
    keys = [2, 9]
    gate, steps = _gate(rule), [_vectors(s, problems=2) for s in range(6)]
    for main, aux in steps[:3]:
        gate.combine(main, aux, batch_dims=1, problem_keys=keys)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in gate.state_dict().items()}
    rest = [gate.combine(main, aux, batch_dims=1, problem_keys=keys)[0] for main, aux in steps[3:]]
    resumed = _gate(rule)
    resumed.load_state_dict(saved)
    main, aux = steps[3]
    _, stats = resumed.combine(main, [aux[0] * float("nan"), *aux[1:]], batch_dims=1, problem_keys=keys)
    assert not bool(stats.finite.any())
    for (main, aux), want in zip(steps[3:], rest):
        torch.testing.assert_close(resumed.combine(main, aux, batch_dims=1, problem_keys=keys)[0], want)


def test_problem_keys_are_checked_up_front():
    gate = GradientGate(rule="pcgrad")
    main, aux = _vectors(0, problems=2)
    with pytest.raises(ValueError, match="one key per"):
        gate.combine(main, aux, batch_dims=1, problem_keys=[1, 2, 3])
    with pytest.raises(TypeError, match="must be ints"):
        gate.combine(main, aux, batch_dims=1, problem_keys=[1, 2.0])
    assert int(gate.state.step) == 0  # nothing ran


def test_rlw_keyed_weights_follow_the_key_not_the_place():
    like = torch.zeros((), dtype=DT)
    together, alone, unkeyed = RLW(seed=2), RLW(seed=2), RLW(seed=2)
    moved = 0
    for _ in range(4):
        w_all = together.batched_weights((3,), 2, like, keys=[5, 8, 13])
        w_one = alone.batched_weights((1,), 2, like, keys=[8])
        torch.testing.assert_close(w_all[1], w_one[0])
        moved += not torch.allclose(unkeyed.batched_weights((3,), 2, like)[1], w_one[0])
        for rlw in (together, alone, unkeyed):
            rlw.observe_losses(torch.ones(()), torch.ones((), dtype=torch.bool))
    assert moved > 0
    with pytest.raises(ValueError, match="one key per"):
        RLW().batched_weights((3,), 2, like, keys=[1])
