"""The one-pass finiteness check the collectives use on the averaged buffers (issue 24, item 6)."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim.parallel.collectives import any_nonfinite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_any_nonfinite_matches_the_element_wise_check(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        t = torch.randn(int(torch.randint(1, 5000, (1,), generator=g)), generator=g).to(dtype)
        kind = trial % 5
        if kind:  # 1: nan, 2: +inf, 3: -inf, 4: +inf and -inf (their sum is nan)
            i = int(torch.randint(0, t.numel(), (1,), generator=g))
            t[i] = (float("nan"), float("inf"), -float("inf"), float("inf"))[kind - 1]
            if kind == 4:
                t[(i + 1) % t.numel()] = -float("inf")
        assert bool(any_nonfinite(t)) == (not bool(torch.isfinite(t).all())), (trial, dtype)


def test_finite_values_whose_sum_overflows_are_finite():
    big = torch.full((8,), torch.finfo(torch.float32).max)
    assert not torch.isfinite(big.sum())  # the sum overflows ...
    assert not bool(any_nonfinite(big))  # ... but every element is finite
    big[3] = float("nan")
    assert bool(any_nonfinite(big))


def test_integer_and_empty_tensors():
    assert not bool(any_nonfinite(torch.arange(5)))
    assert not bool(any_nonfinite(torch.zeros(0)))
