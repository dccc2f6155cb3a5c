"""GradSimMonitor with real Lightning loggers."""

import csv
import glob
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_gradsim import GradientGate, GradSimMonitor

from .test_mixin import GatedNet, make_loader


class TwoAux(GatedNet):
    def __init__(self):
        super().__init__(rule="unweighted", cosine_ema=0.5)
        self.aux2 = torch.nn.Linear(16, 2)

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        x, y, _ = batch
        losses["flipped"] = torch.nn.functional.cross_entropy(self.aux2(self.trunk(x)), 1 - y)
        return losses


def run(tmp_path, logger, **monitor_kwargs):
    monitor = GradSimMonitor(**monitor_kwargs)
    model = TwoAux()
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(model, make_loader())
    return monitor, model, trainer


def test_csv_logger_gets_every_metric_with_stable_names(tmp_path):
    monitor, model, trainer = run(tmp_path, CSVLogger(tmp_path), plot=True)
    path = os.path.join(trainer.logger.log_dir, "metrics.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    names = set(rows[0])
    for task in ["parity", "flipped"]:
        for key in ["cos", "cos_smoothed", "weight", "gate_open", "open_fraction", "grad_norm"]:
            assert f"gradsim/{key}/{task}" in names
    assert {"gradsim/grad_norm/main", "gradsim/skipped_steps"} <= names
    gated_rows = [r for r in rows if r.get("gradsim/cos/parity")]
    assert len(gated_rows) == 6  # one per step
    # logged values agree with the gate's own state at the end
    last = gated_rows[-1]
    assert float(last["gradsim/open_fraction/parity"]) == pytest.approx(model.gradsim.open_fraction()[0].item())
    for r in gated_rows:
        w, o, c = (
            float(r["gradsim/weight/parity"]),
            float(r["gradsim/gate_open/parity"]),
            float(r["gradsim/cos_smoothed/parity"]),
        )
        assert o == float(c >= 0.0) and w == o  # unweighted, lambda 1
    assert os.path.exists(monitor.plot_path) and os.path.getsize(monitor.plot_path) > 10_000
    assert monitor.plot_path.endswith("gradsim.png")


def test_tensorboard_logger_and_logging_interval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor, _, trainer = run(tmp_path, TensorBoardLogger(tmp_path), logging_interval=4, plot=str(tmp_path / "p.png"))
    events = glob.glob(os.path.join(trainer.logger.log_dir, "events.*"))
    acc = EventAccumulator(events[0])
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradsim/cos/parity")]
    assert steps == [0, 4]  # batches 1 and 5 of 6, at the step Lightning logs their train/loss at
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]
    assert len(monitor.history["gradsim/cos/flipped"]) == 2
    assert os.path.exists(tmp_path / "p.png")


def test_monitor_state_survives_a_checkpoint_round_trip():
    m = GradSimMonitor()
    m.history = {"step": [1.0, 2.0], "gradsim/cos/a": [0.1, -0.2]}
    m2 = GradSimMonitor()
    m2.load_state_dict(m.state_dict())
    assert m2.history == m.history


def test_bad_logging_interval():
    with pytest.raises(ValueError, match="logging_interval"):
        GradSimMonitor(logging_interval=0)


def test_metrics_from_a_gate_used_outside_the_mixin():
    gate = GradientGate(rule="weighted")
    _, stats = gate.combine(torch.tensor([1.0, 0.0]), {"a": torch.tensor([1.0, 1.0])})
    metrics = GradSimMonitor.metrics_from(stats, gate)
    assert metrics["gradsim/weight/a"] == pytest.approx(2**-0.5)
    assert metrics["gradsim/gate_open/a"] == 1.0


def test_one_step_number_per_batch_and_a_skipped_step_logs_as_skipped(tmp_path):
    class Flaky(TwoAux):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            if batch_idx == 2:
                losses["parity"] = losses["parity"] * float("nan")
            return losses

    monitor = GradSimMonitor()
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    with pytest.warns(RuntimeWarning, match="Skipping a training step"):
        trainer.fit(Flaky(), make_loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    gate_rows = {int(r["step"]): r for r in rows if r.get("gradsim/skipped")}
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert sorted(gate_rows) == loss_steps == [0, 1, 2, 3, 4, 5]  # batch b at step b, both
    skipped = gate_rows[2]
    assert float(skipped["gradsim/skipped"]) == 1.0 and float(skipped["gradsim/skipped_steps"]) == 1.0
    for key in ("cos", "weight", "gate_open", "grad_norm"):
        assert skipped[f"gradsim/{key}/parity"] == "", key  # it decided nothing
    assert all(
        float(gate_rows[s]["gradsim/skipped"]) == 0.0 and gate_rows[s]["gradsim/cos/parity"] for s in (0, 1, 3, 4, 5)
    )
    cos = monitor.history["gradsim/cos/parity"]
    assert len(cos) == len(monitor.history["step"]) == 6 and cos[2] != cos[2]  # NaN keeps the curves aligned


def test_the_cosines_mean_standard_error_and_noise_fraction_are_logged():
    from lightning_gradsim import GradientGate, GradSimMonitor

    gate = GradientGate(rule="unweighted")
    main = torch.tensor([1.0, 0.0])
    cosines = []
    for aux in ([1.0, 1.0], [1.0, 3.0], [1.0, -0.2]):
        _, stats = gate.combine(main, {"a": torch.tensor(aux)})
        cosines.append(float(stats.cosine))
    metrics = GradSimMonitor.metrics_from(stats, gate)
    n = len(cosines)
    mean = sum(cosines) / n
    sd = (sum((c - mean) ** 2 for c in cosines) / (n - 1)) ** 0.5
    assert metrics["gradsim/cos_mean/a"] == pytest.approx(mean, abs=1e-6)
    assert metrics["gradsim/cos_se/a"] == pytest.approx(sd / n**0.5, abs=1e-6)  # fewer than 2 windows: naive
    # decided by noise, step by step, with the standard error that includes the step (none at step 1)
    expected = 1  # step 1: no estimate yet
    for t_ in (2, 3):
        c = cosines[:t_]
        m = sum(c) / t_
        se_t = (sum((x - m) ** 2 for x in c) / (t_ - 1)) ** 0.5 / t_**0.5
        expected += abs(c[-1]) < 2 * se_t
    assert 0 < expected < 3  # the case decides some, not all: the count is informative
    assert metrics["gradsim/noise_decided/a"] == pytest.approx(expected / 3)
