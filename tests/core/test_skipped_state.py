"""A step skipped for a NaN/inf leaves every piece of the gate's state as it was, also when the NaN is
found only after the rule decided: on the feature path (``similarity="features"``) the backward through
the trunk needs the weights, and its gradients can overflow while the feature gradients are finite (a
scaled fp16 loss, a ``sqrt`` at 0)."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim import GradientGate

from .._poison import PoisonGrad


def _run(options: dict, poison: int | None, skip: int | None, steps: int = 6) -> GradientGate:
    torch.manual_seed(0)
    lower, upper = torch.nn.Linear(3, 5), torch.nn.Linear(5, 4)
    heads = [torch.nn.Linear(4, 1) for _ in range(3)]
    gate = GradientGate(similarity="features", **options)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(8, 3, generator=data), torch.randn(3, 8, 1, generator=data)
        if step == skip:
            continue
        h = upper(PoisonGrad.apply(torch.tanh(lower(x)), step == poison))
        h = gate.mark_features(h)
        losses = [(head(h) - y[i]).pow(2).mean() for i, head in enumerate(heads)]
        stats = gate.backward(losses[0], losses[1:], [*lower.parameters(), *upper.parameters()])
        assert bool(stats.finite) == (step != poison)
    return gate


@pytest.mark.parametrize(
    "options",
    [
        {"rule": "weighted", "cosine_ema": 0.9},
        {"rule": "projection", "main_grad_ema": 0.9},
        {"rule": "gradvac"},
        {"rule": "pcgrad", "seed": 3, "cosine_ema": 0.5},
    ],
    ids=["cosine_ema", "direction_ema", "gradvac", "pcgrad"],
)
def test_a_nan_in_the_trunks_backward_on_the_feature_path_leaves_the_state_as_without_that_batch(options):
    poisoned = _run(options, poison=2, skip=None).state_dict()
    reference = _run(options, poison=None, skip=2).state_dict()
    assert int(poisoned["state.skipped_steps"]) == 1 and int(reference["state.skipped_steps"]) == 0
    assert int(poisoned["state.step"]) == int(reference["state.step"]) + 1
    assert poisoned.keys() == reference.keys()
    for key, value in reference.items():
        if key in ("state.skipped_steps", "state.step") or not isinstance(value, torch.Tensor):
            continue
        torch.testing.assert_close(poisoned[key], value, rtol=0, atol=0, msg=key)
