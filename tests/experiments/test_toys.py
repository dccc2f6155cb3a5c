"""Toy problems against closed forms: gradient descent, summing's fixed points, gating's convergence."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.experiments.toy_blog import (
    BLOG_RULES,
    OPTIMIZERS,
    BlogCircle,
    auxiliary_grad,
    primary_grad,
    primary_loss,
    run_blog_circle,
    settling_step,
)
from lightning_gradsim.experiments.toy_figure2 import ROWS, convergence_times, random_starts
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
    assert gradsim(["toy", "trajectories", "--problem", "paper", "--rules", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "Unknown rule" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Unknown toy problem"):
        run_toy("nope")


# ------------------------------------------------------------------ the blog's unit-circle toy
def test_blog_toy_defaults_are_the_blogs_settings():
    s = BlogCircle()
    assert s.start == (0.0, 2.0) and s.aux_weight == 0.1 and s.lr == 0.01 and s.betas == (0.9, 0.999)
    assert s.aux_point == (2.0, 0.0)
    assert BLOG_RULES == ("sum", "projection", "unweighted", "weighted") and OPTIMIZERS == ("adam", "gd")
    # L_primary = (sqrt(x^2 + y^2) - 1)^2 and its gradient, by hand at (0, 2) and (3, 4)
    t = torch.tensor([[0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert primary_loss(t).tolist() == [1.0, 16.0]
    torch.testing.assert_close(primary_grad(t), torch.tensor([[0.0, 2.0], [8 * 0.6, 8 * 0.8]], dtype=torch.float64))
    torch.testing.assert_close(auxiliary_grad(t), torch.tensor([[-4.0, 4.0], [2.0, 8.0]], dtype=torch.float64))


def test_blog_toy_first_steps_by_hand():
    """GD: theta_1 = theta_0 - 0.01 (g_p + 0.1 g_a). Adam's first step moves each coordinate by lr."""
    s = BlogCircle(steps=1, random_starts=0)
    gd = run_blog_circle("gd", ("sum", "unweighted"), s)
    torch.testing.assert_close(gd["sum"][1, 0], torch.tensor([0.004, 1.976], dtype=torch.float64))
    # at (0, 2): cos(g_p, g_a) = (0, 2).(-4, 4) / (2 * 4 sqrt 2) > 0, so the gate is open: same step
    torch.testing.assert_close(gd["unweighted"][1, 0], gd["sum"][1, 0])
    adam = run_blog_circle("adam", ("sum",), s)
    g = torch.tensor([-0.4, 2.4], dtype=torch.float64)  # g_p + 0.1 g_a at (0, 2)
    step = 0.01 * g / ((g**2).sqrt() + 1e-8)  # bias-corrected m = g, v = g^2 after one step
    torch.testing.assert_close(adam["sum"][1, 0], torch.tensor([0.0, 2.0], dtype=torch.float64) - step)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        run_blog_circle("rmsprop", settings=s)


def test_settling_step():
    path = torch.tensor([[[0.0, 0.0]], [[0.99, 0.0]], [[0.5, 0.0]], [[1.0, 0.01]], [[1.0, 0.0]]], dtype=torch.float64)
    assert settling_step(path, (1.0, 0.0), 0.05).tolist() == [3]
    assert settling_step(path[:3], (1.0, 0.0), 0.05).tolist() == [-1]


def test_blog_toy_multitask_fixed_point_and_gd_gate_stops_on_the_circle():
    """Multitask's fixed point on the x axis solves 2 (x - 1) + 0.2 (x - 2) = 0: x = 2.4 / 2.2."""
    fixed = (2.4 / 2.2, 0.0)  # gradient descent stays there (Adam magnifies the 1e-16 residual)
    stay = run_blog_circle("gd", ("sum",), BlogCircle(start=fixed, steps=5, random_starts=0))["sum"]
    torch.testing.assert_close(stay[:, 0], torch.tensor([fixed] * 6, dtype=torch.float64), atol=1e-12, rtol=0)
    near = run_blog_circle("gd", ("sum",), BlogCircle(start=(1.2, 0.3), steps=5, random_starts=0))["sum"]
    target = torch.tensor(fixed, dtype=torch.float64)
    assert (near[-1, 0] - target).norm() < (near[0, 0] - target).norm()
    gd = run_blog_circle("gd", ("unweighted",), BlogCircle(steps=900, random_starts=0))
    end = gd["unweighted"][-1, 0]  # the blog: stops on the unit circle far from (1, 0)
    assert abs(float(end.norm()) - 1) < 1e-3
    assert float((end - torch.tensor([1.0, 0.0], dtype=torch.float64)).norm()) > 0.5


def test_toy_blog_command_end_to_end(tmp_path, capsys):
    assert (
        gradsim(
            ["toy", "--steps", "40", "--random-starts", "3", "--rules", "sum", "projection", "--out-dir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| adam | sum |" in out and "| gd | projection |" in out and "The blog's statements" in out
    assert (tmp_path / "blog_circle.png").stat().st_size > 10_000
    assert "| gd | sum |" in (tmp_path / "blog_circle.md").read_text()


# ------------------------------------------------------------------ Figure 2's convergence time
def test_convergence_time_closed_form_for_the_quadratic():
    """main_only on L1 = |t|^2 with step 0.01: L_t = L_0 0.98^(2t); the first t with L_t < 0.1."""
    starts = random_starts(40, box=2.0, seed=3)
    res = convergence_times("L1+L2", "main_only", starts, steps=600, lr=0.01, level=0.1)
    l0 = (starts**2).sum(-1)
    expected = torch.where(
        l0 < 0.1, torch.zeros_like(l0), torch.floor(torch.log(0.1 / l0) / (2 * math.log(0.98))) + 1
    ).long()
    assert res.steps.tolist() == expected.tolist()
    assert res.converged.all() and not res.diverged.any()
    short = convergence_times("L1+L2", "main_only", torch.tensor([[2.0, 0.0]], dtype=torch.float64), steps=50)
    assert short.steps.tolist() == [-1]  # needs 92 steps (4 * 0.98^(2t) < 0.1 first at t = 92)


def test_figure2_rows_sum_and_gate_outcomes():
    starts = random_starts(8, seed=1)
    # summing L1 and L2 converges to (0.5, 0.5), where L1 = 0.5 > 0.1: never converged
    summed = convergence_times("L1+L2", "sum", starts, steps=300)
    assert not summed.converged.any()
    torch.testing.assert_close(summed.paths[-1], torch.full((8, 2), 0.5, dtype=torch.float64), atol=1e-3, rtol=0)
    # the gated rules keep the main loss decreasing (Proposition 1): every start converges
    # (|t0|^2 <= 8 in the box: main-only descent needs at most 109 steps)
    for rule in ("unweighted", "weighted"):
        res = convergence_times("L1+V", rule, starts, steps=150)
        assert res.converged.all()
        assert (ROWS["L1+V"].main_loss(res.paths).diff(dim=0) <= 1e-12).all()
    # V: g_main + V = (-t2 + t2^2, t1 + t1^2) by hand
    t = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    torch.testing.assert_close(
        ROWS["L1+V"].main_grad(t) + ROWS["L1+V"].aux_field(t),
        torch.tensor([[0.7 + 0.49, 0.3 + 0.09]], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="Unknown Figure 2 row"):
        convergence_times("L9", "sum", starts)


def test_figure2_shows_both_readings_of_v():
    """The garbled V read as a gradient-like term (``L1+V``) and as a velocity (``L1-V``: aux vector -V)."""
    from lightning_gradsim.experiments.toy_figure2 import figure2_table

    t = torch.tensor([[0.3, -0.7]], dtype=torch.float64)  # -V = (t2 - t2^2 + 2 t1, -t1 - t1^2 + 2 t2) by hand
    torch.testing.assert_close(
        ROWS["L1-V"].aux_field(t), torch.tensor([[-0.7 - 0.49 + 0.6, -0.3 - 0.09 - 1.4]]).double()
    )
    table, _ = figure2_table(rules=["main_only"], n_starts=1, steps=2)
    assert [r["row"] for r in table] == ["L1+L2", "L1+V", "L1-V", "L3+L4"]  # side by side by default
    # reading 2: near the origin -V agrees with grad L1, the gate opens and speeds descent up
    starts = random_starts(8, seed=1)
    main = convergence_times("L1-V", "main_only", starts, steps=150)
    gated = convergence_times("L1-V", "unweighted", starts, steps=150)
    assert gated.converged.all() and (gated.steps <= main.steps).all() and (gated.steps < main.steps).any()


def test_toy_figure2_command_end_to_end(tmp_path, capsys):
    assert (
        gradsim(
            [
                "toy",
                "figure2",
                "--rows",
                "L1+L2,L3+L4",
                "--rules",
                "main_only",
                "unweighted",
                "--starts",
                "6",
                "--steps",
                "60",
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| L3+L4 | unweighted |" in out
    with open(tmp_path / "figure2.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 and {r["rule"] for r in rows} == {"main_only", "unweighted"}
    for r in rows:
        assert float(r["converged"]) + float(r["diverged"]) + float(r["stalled"]) == pytest.approx(1.0)
    assert (tmp_path / "figure2.png").stat().st_size > 10_000
