"""The paper-figure scripts: the paper's functions and paths, closed-form values, each PNG file."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_gradsim.experiments import figures
from lightning_gradsim.experiments.toy_figure2 import ROWS, convergence_times

PNG = b"\x89PNG\r\n\x1a\n"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "figures"


# ------------------------------------------------------------------ Proposition 3
def test_proposition3_paths_are_the_papers_up_right_and_right_up():
    paths = figures.proposition3_paths()
    (p, up, q), (p2, right, q2) = paths["A"], paths["B"]
    assert p == p2 == figures.P3_START and q == q2 == figures.P3_END
    assert up[0] == p[0] and up[1] > p[1] and up[1] == q[1]  # A: up, then right
    assert right[1] == p[1] and right[0] > p[0] and right[0] == q[0]  # B: right, then up


def test_proposition3_line_integrals_match_hand_computation():
    """P = (-0.5, 0), Q = (2.5, 1.5); main |t|^2/2, aux |t - (2, 0)|^2/2, gate closed iff t.(t - (2, 0)) < 0.

    Main field: L(Q) - L(P) = 4.25 - 0.125 = 4.125 on both paths. Gated, A (x = -0.5 up, then
    y = 1.5 right) never enters the disk: 4.125 + L_aux(Q) - L_aux(P) = 4.125 + 1.25 - 3.125 = 2.25.
    B runs along y = 0 through the disk, where the auxiliary part is dropped for 0 < x < 2:
    aux = int_{-0.5}^{0} (x - 2) dx + int_{2}^{2.5} (x - 2) dx + int_0^{1.5} y dy = -1.125 + 0.125 + 1.125.
    """
    main_a, merged_a = figures.line_integral(figures.proposition3_paths()["A"])
    main_b, merged_b = figures.line_integral(figures.proposition3_paths()["B"])
    assert main_a == pytest.approx(4.125, abs=1e-6) and main_b == pytest.approx(4.125, abs=1e-6)
    assert merged_a == pytest.approx(2.25, abs=1e-3)
    assert merged_b == pytest.approx(4.25, abs=1e-3)


# ------------------------------------------------------------------ Appendix B
def test_negative_example_uses_the_papers_functions():
    row = ROWS[figures.NEGATIVE_ROW]
    t = torch.tensor([[-0.5, 1.0], [0.5, 1.0], [2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    # L3 = (t1 < 0)(t1^2 + t2^2) + (t1 >= 0)(1 - exp(-2 (t1^2 + t2^2)))
    expected = torch.tensor([1.25, 1 - math.exp(-2.5), 1 - math.exp(-8.5)], dtype=torch.float64)
    torch.testing.assert_close(row.main_loss(t.detach()), expected)
    (grad,) = torch.autograd.grad(row.main_loss(t).sum(), t)
    torch.testing.assert_close(row.main_grad(t.detach()), grad)
    # L4 = (t1 - 2)^2 + (t2 - 0.5)^2: its gradient vanishes at (2, 0.5)
    torch.testing.assert_close(row.aux_field(t.detach())[2], torch.zeros(2, dtype=torch.float64))


def test_negative_example_gate_slows_some_starts_and_not_others():
    """From (-0.2, 1.8) main-only descent stays on L3 = |t|^2: |t0|^2 0.98^(2t) < 0.1 first at t = 87.
    The gate lets L4 pull the point into the flat half (t1 >= 0): far more steps."""
    starts = torch.tensor([[-0.2, 1.8], [-0.3, -1.5]], dtype=torch.float64)
    main = convergence_times(figures.NEGATIVE_ROW, "main_only", starts)
    gated = convergence_times(figures.NEGATIVE_ROW, "unweighted", starts)
    l0 = (starts**2).sum(-1)
    assert main.steps.tolist() == (torch.floor(torch.log(0.1 / l0) / (2 * math.log(0.98))) + 1).long().tolist()
    assert gated.steps[0] > 2 * main.steps[0]  # slowed
    assert 0 <= gated.steps[1] < main.steps[1]  # sped up
    assert figures.slowed_down({"main_only": main, "unweighted": gated}).tolist() == [True, False]


# ------------------------------------------------------------------ Appendix E
def test_independent_cosines_match_closed_forms():
    """Isotropic pairs: E cos = 0, Var cos = 1/d, E|cos| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    gen = torch.Generator().manual_seed(5)
    n = 4000
    for d in (3, 400):
        c = figures.independent_cosines(d, n, sigma=3.0, gen=gen)  # sigma does not matter
        assert abs(float(c.mean())) < 4 / math.sqrt(n * d)
        assert float(c.var()) == pytest.approx(1 / d, rel=0.1)
        se = float(c.abs().std()) / math.sqrt(n)
        assert abs(float(c.abs().mean()) - figures._expected_abs_cosine(d)) < 4 * se
    assert figures._expected_abs_cosine(2) == pytest.approx(2 / math.pi)


def test_noise_model_matches_an_independent_monte_carlo_and_its_limit():
    """mu ~ N(0, I), theta_i ~ N(mu, sigma I) (covariance sigma I): numpy Monte Carlo as truth at
    small d; 1 / (1 + sigma) as d grows (a reading of sigma as the s.d. would give 1 / (1 + sigma^2))."""
    rng = np.random.default_rng(123)
    gen = torch.Generator().manual_seed(9)
    n = 3000
    for d, sigma in ((4, 1.0), (10, 4.0)):
        mu = rng.standard_normal((n, d))
        a = mu + math.sqrt(sigma) * rng.standard_normal((n, d))
        b = mu + math.sqrt(sigma) * rng.standard_normal((n, d))
        truth = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        ours = figures.noisy_copy_cosines(d, n, sigma, gen)
        se = math.sqrt(truth.var() / n + float(ours.var()) / n)
        assert abs(float(ours.mean()) - truth.mean()) < 4 * se
    for sigma in (0.25, 4.0):
        c = figures.noisy_copy_cosines(4000, 200, sigma, gen)
        assert float(c.mean()) == pytest.approx(figures.noisy_cosine_limit(sigma), abs=0.01)
    c = figures.cosine_curves(dims=(5, 2000), trials=100, sigmas=(1.0,))
    assert c["noisy_1_sd"][1] < c["noisy_1_sd"][0]  # concentrates as d grows
    assert c["independent_abs"][1] < c["independent_abs"][0]


# ------------------------------------------------------------------ the PNGs
@pytest.mark.parametrize("name", ["negative_example", "proposition3", "cosine_vs_dimension"])
def test_each_example_script_writes_its_png(tmp_path, monkeypatch, name):
    out = tmp_path / f"{name}.png"
    if name == "cosine_vs_dimension":  # fewer dimensions and trials keep the test quick
        original = figures.cosine_curves
        monkeypatch.setattr(figures, "cosine_curves", lambda **kw: original(dims=(2, 50, 2000), trials=20))
    if name == "negative_example":  # fewer starts keep the test quick
        original_runs = figures.negative_example_runs
        monkeypatch.setattr(figures, "negative_example_runs", lambda **kw: original_runs(**{**kw, "n_starts": 12}))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", str(out)])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert out.read_bytes()[:8] == PNG
    assert out.stat().st_size > 10_000


def test_cli_figures_only(tmp_path):
    assert figures.main(["--out", str(tmp_path), "--only", "proposition3"]) == 0
    assert (tmp_path / "proposition3.png").read_bytes()[:8] == PNG
    assert figures.main(["--only", "nope"]) == 2
