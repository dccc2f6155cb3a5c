"""benchmarks/gpu_check.py in its CPU form (small sizes): every section runs and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--fit-steps", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for section in ("shared batch", "separate batches"):
        for aux in (1, 3):
            assert f"mlp, {aux} aux, {section}" in text
    assert text.count("| gate unweighted |") == 4 and text.count("| two-backward loop |") == 4
    assert text.count("| torchjd PCGrad") == 4  # measured, or "(not installed)"
    assert "| plain LightningModule (summed losses) |" in text and "| MultiTaskClassifier (GradSimMixin" in text
    assert "FSDP2: skipped" in text
