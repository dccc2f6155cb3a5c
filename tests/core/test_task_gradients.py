"""The rows layout's Gramian (no stacked copy) and combination (built in place when owned) against the
former formulas: a stack of each tensor's per-task gradients (zeros where a task does not reach it)
times its transpose, and ``.grad = sum_k w_k g_k`` in a new tensor."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim.core.gradients import per_task_gradients
from lightning_gradsim.core.task_gradients import TaskGradients

SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (7,)]


def _rows(k: int, dtype: torch.dtype, missing: set[tuple[int, int]], seed: int = 0) -> list[list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            None if (t, i) in missing else torch.randn(shape, generator=gen, dtype=dtype)
            for i, shape in enumerate(SHAPES)
        ]
        for t in range(k)
    ]


def _old_gramian(rows: list[list[torch.Tensor | None]]) -> torch.Tensor:
    """The former formula, in float64: per present tensor, (K, P) stack (zeros for None) @ its transpose."""
    grams = []
    for i, shape in enumerate(SHAPES):
        if all(r[i] is None for r in rows):
            continue
        n = torch.Size(shape).numel()
        f = torch.stack(
            [torch.zeros(n, dtype=torch.float64) if r[i] is None else r[i].double().reshape(-1) for r in rows]
        )
        grams.append(f @ f.T)
    return torch.stack(grams)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("missing", [set(), {(1, 0)}, {(0, 2), (1, 4)}, {(0, 1), (1, 1), (2, 1)}])
def test_rows_gramian_equals_stacked_formula(dtype: torch.dtype, k: int, missing: set[tuple[int, int]]) -> None:
    rows = _rows(k, dtype, missing)
    gram = TaskGradients(rows=rows).gramian()
    assert gram.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(gram.double(), _old_gramian(rows), rtol=tol, atol=tol)


def test_rows_gramian_with_direction_matches_stacked_layout() -> None:
    rows = _rows(2, torch.float64, {(1, 3)})
    direction = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    got = TaskGradients(rows=rows).gramian(direction)
    want = TaskGradients(rows=rows).to_stacked().gramian(direction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("weights", [[1.0, 0.5], [0.25, -2.0], [1.0, 0.0]])
def test_write_rows_equals_weighted_sum(owned: bool, weights: list[float]) -> None:
    rows = _rows(2, torch.float64, {(0, 1)}, seed=3)  # task 0 misses tensor 1: task 1 starts its .grad
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    params[4].grad = torch.ones(SHAPES[4], dtype=torch.float64)  # an existing .grad is accumulated into
    want = []
    for i, p in enumerate(params):
        total = torch.zeros(SHAPES[i], dtype=torch.float64) if p.grad is None else p.grad.clone()
        for w, r in zip(weights, rows):
            if r[i] is not None:
                total = total + w * r[i]
        want.append(total)
    copies = [[None if g is None else g.clone() for g in r] for r in rows]
    TaskGradients(rows=rows, params=params, owned=owned).apply(torch.tensor(weights, dtype=torch.float64), into=params)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
    if not owned:  # not owned: the gradients are left as they were
        for r, c in zip(rows, copies):
            for g, h in zip(r, c):
                assert (g is None and h is None) or torch.equal(g, h)


def test_owned_write_skips_aliased_and_expanded_gradients() -> None:
    shared = torch.randn(4, dtype=torch.float64)
    expanded = torch.ones((), dtype=torch.float64).expand(3)
    rows = [[shared, shared.view(2, 2), expanded], [torch.ones(4, dtype=torch.float64), None, None]]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in [(4,), (2, 2), (3,)]]
    before = shared.clone()
    TaskGradients(rows=rows, params=params, owned=True).apply(
        torch.tensor([2.0, 1.0], dtype=torch.float64), into=params
    )
    assert torch.equal(shared, before)  # two parameters' gradients share memory: neither written in place
    torch.testing.assert_close(params[0].grad, 2 * before + 1)
    torch.testing.assert_close(params[1].grad, 2 * before.view(2, 2))
    torch.testing.assert_close(params[2].grad, torch.full((3,), 2.0, dtype=torch.float64))


def test_gate_rows_are_owned_only_without_hooks() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    h = w.tanh()
    assert per_task_gradients([h.sum(), (h * h).sum()], [w], []).owned
    h = w.tanh()
    hooked = per_task_gradients([h.sum(), (h * h).sum()], [w], [], on_task=lambda *a: None)
    assert not hooked.owned
    hooked.map(lambda t: t)
    assert not TaskGradients(rows=[[torch.ones(1)]], owned=True).to_stacked().owned
