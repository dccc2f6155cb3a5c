"""Toy problems against closed forms: gradient descent, summing's fixed points, gating's convergence."""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.experiments.toys import PROBLEMS, run_toy


def test_main_only_is_plain_gradient_descent():
    paths = run_toy("paper", rules=["main_only"], steps=10, lr=0.1, starts=[[1.0, -2.0]])
    expected = (
        torch.tensor([1.0, -2.0], dtype=torch.float64)
        * (1 - 2 * 0.1) ** torch.arange(11.0, dtype=torch.float64)[:, None]
    )
    assert torch.allclose(paths["main_only"][:, 0], expected)


def test_sum_reaches_the_compromise_and_gating_the_main_minimum():
    paths = run_toy("paper", rules=["sum", "unweighted", "weighted"], steps=80, lr=0.15)
    # sum: 2 theta + 2 (theta - 1) = 0  ->  theta = 0.5
    assert torch.allclose(paths["sum"][-1], torch.full((4, 2), 0.5, dtype=torch.float64), atol=1e-6)
    for rule in ("unweighted", "weighted"):
        assert paths[rule][-1].abs().max() < 1e-3
    # the non-gradient field: 2 theta + 2 d + 2 R d = 0 with d = theta - 1  ->  theta = (0.4, 0.8) by hand
    field = run_toy("paper_field", rules=["sum", "unweighted"], steps=80, lr=0.15)
    assert torch.allclose(field["sum"][-1], torch.tensor([[0.4, 0.8]] * 4, dtype=torch.float64), atol=1e-6)
    assert field["unweighted"][-1].abs().max() < 1e-3


def test_circle_gating_stays_on_the_main_minimum_set():
    paths = run_toy("circle", rules=["sum", "projection"], steps=150, lr=0.05)
    radius = paths["projection"][-1].norm(dim=-1)
    assert torch.allclose(radius, torch.ones(4, dtype=torch.float64), atol=1e-2)
    assert (paths["sum"][-1].norm(dim=-1) > 1.05).all()  # summing leaves the circle towards (2, 0)


def test_toy_command_writes_pngs(tmp_path, capsys):
    assert (
        gradsim(["toy", "--problem", "all", "--steps", "5", "--rules", "sum", "unweighted", "--out-dir", str(tmp_path)])
        == 0
    )
    for problem in PROBLEMS:
        assert (tmp_path / f"{problem}.png").stat().st_size > 1000
    assert gradsim(["toy", "--rules", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "Unknown rule" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Unknown toy problem"):
        run_toy("nope")
