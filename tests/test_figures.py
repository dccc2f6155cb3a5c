"""The paper-figure scripts: closed-form values behind each figure, and each PNG file."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest

from lightning_gradsim.experiments import figures

PNG = b"\x89PNG\r\n\x1a\n"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "figures"


def test_proposition3_line_integrals_match_hand_computation():
    """Main field: L(Q) - L(P) = (2.5^2 - 0.5^2) / 2 = 3 on both paths.

    Gated field on A (y = 0): the gate is closed for x in (0, 2), so A = 3 + int_{-0.5}^{0} (x - 2) dx
    + int_{2}^{2.5} (x - 2) dx = 3 - 1.125 + 0.125 = 2. On B the gate stays open: 3 + L_aux(Q) -
    L_aux(P) = 3 + (0.125 - 3.125) = 0.
    """
    paths = figures.proposition3_paths()
    main_a, merged_a = figures.line_integral(paths["A"])
    main_b, merged_b = figures.line_integral(paths["B"])
    assert main_a == pytest.approx(3.0, abs=1e-6) and main_b == pytest.approx(3.0, abs=1e-6)
    assert merged_a == pytest.approx(2.0, abs=1e-3)
    assert merged_b == pytest.approx(0.0, abs=1e-3)


def test_negative_example_gate_slows_convergence():
    paths = figures.negative_example_trajectories(rules=("main_only", "unweighted", "sum"), steps=250)
    main_steps = figures.steps_to_reach(paths["main_only"])
    gated_steps = figures.steps_to_reach(paths["unweighted"])
    assert main_steps is not None and gated_steps is not None
    assert gated_steps > 2 * main_steps  # 104 vs 44
    assert paths["unweighted"][:, 0].max() > 3.0  # dragged into the flat region
    # sum never reaches the main minimum: it converges to the compromise x = 8 - 2x / (1 + x^2).
    x = float(paths["sum"][-1, 0])
    assert figures.steps_to_reach(paths["sum"]) is None
    assert x == pytest.approx(8 - 2 * x / (1 + x * x), abs=1e-3)


def test_cosine_curves_follow_theory():
    c = figures.cosine_curves(dims=(2, 100, 10000), trials=300)
    # E|cos| in 2-D is 2/pi (uniform angle); in high dimension ~ sqrt(2 / (pi d)).
    assert c["independent_theory"][0] == pytest.approx(2 / math.pi)
    assert c["independent_theory"][2] == pytest.approx(math.sqrt(2 / (math.pi * 10000)), rel=1e-3)
    for got, want, sd in zip(c["independent"], c["independent_theory"], c["independent_sd"]):
        assert abs(got - want) < 4 * sd / math.sqrt(300)
    assert c["independent"][0] > c["independent"][1] > c["independent"][2]
    assert c["noisy"][0] < c["noisy"][1] < c["noisy"][2]
    assert c["noisy"][2] == pytest.approx(10000 / 10100, abs=2e-3)
    assert c["noisy"][1] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("name", ["negative_example", "proposition3", "cosine_vs_dimension"])
def test_each_example_script_writes_its_png(tmp_path, monkeypatch, name):
    out = tmp_path / f"{name}.png"
    if name == "cosine_vs_dimension":  # fewer dimensions and trials keep the test quick
        original = figures.cosine_curves
        monkeypatch.setattr(figures, "cosine_curves", lambda **kw: original(dims=(2, 50, 2000), trials=20))
    if name == "negative_example":  # fewer steps and rules keep the test quick
        original_paths = figures.negative_example_trajectories
        monkeypatch.setattr(
            figures,
            "negative_example_trajectories",
            lambda **kw: original_paths(rules=("main_only", "unweighted"), steps=120, lr=kw["lr"]),
        )
    monkeypatch.setattr(sys, "argv", [f"{name}.py", str(out)])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert out.read_bytes()[:8] == PNG
    assert out.stat().st_size > 10_000


def test_cli_figures_only(tmp_path):
    assert figures.main(["--out", str(tmp_path), "--only", "proposition3"]) == 0
    assert (tmp_path / "proposition3.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit):
        figures.main(["--only", "nope"])
