"""``gradsim report``: a real Trainer run's CSV and TensorBoard logs, checked against the raw metrics file;
the reading rules on synthetic logs with known answers; compare/table1 outputs; argument errors."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_gradsim import GradientGate, GradSimMixin, GradSimMonitor
from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.experiments.report import write_report
from lightning_gradsim.experiments.report_stats import running_se


class DigitsNet(GradSimMixin, L.LightningModule):
    """Digits (10 classes) as the main task, the digit's parity as the auxiliary task, on one trunk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.main_head, self.aux_head = nn.Linear(32, 10), nn.Linear(32, 2)
        self.gradsim = GradientGate(rule="unweighted", cosine_ema=0.5)

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {"main": F.cross_entropy(self.main_head(h), y), "parity": F.cross_entropy(self.aux_head(h), y % 2)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("logs")
    digits = load_digits()
    x = torch.tensor(digits.data[:640], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:640])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer = L.Trainer(
        max_epochs=2,
        logger=[CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")],
        callbacks=[GradSimMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
    )
    model = DigitsNet()
    trainer.fit(model, loader)
    return root, model


def raw_columns(path):
    """Independent reading of metrics.csv: {column: [(step, value)]} of the non-blank cells."""
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v != "" and k != "step":
                    out.setdefault(k, []).append((int(row["step"]), float(v)))
    return out


def windows_by_hand(values, w):
    """Batch means by hand: w contiguous windows, the first len % w one value longer."""
    n, out, start = len(values), [], 0
    for i in range(w):
        size = n // w + (1 if i < n % w else 0)
        out.append(sum(values[start : start + size]) / size)
        start += size
    mean = sum(out) / w
    sd = math.sqrt(sum((m - mean) ** 2 for m in out) / (w - 1))
    return sd / math.sqrt(w)


def test_report_of_a_real_trainer_run_matches_the_raw_metrics(digits_run, tmp_path, capsys):
    root, model = digits_run
    assert gradsim(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "csv/version_0 / parity" in printed and "tb/version_0 / parity" in printed
    assert (tmp_path / "rep" / "transfer.png").stat().st_size > 10_000
    text = (tmp_path / "rep" / "transfer.md").read_text()

    reports, _ = write_report(root, tmp_path / "again")
    by_source = {r.source: r for r in reports}
    assert set(by_source) == {"csv", "tensorboard"} and all(r.task == "parity" for r in reports)
    rep = by_source["csv"]

    cols = raw_columns(root / "csv" / "version_0" / "metrics.csv")
    cos = [v for _, v in cols["gradsim/cos/parity"]]
    n = len(cos)
    assert n == 80 == rep.n  # 2 epochs x 40 batches, one logged cosine per step
    mean = sum(cos) / n
    # The monitor logs the gate's own running statistics (GateState.cosine_summary): the report takes the last
    # logged values. Checked by hand here: the mean of the logged cosines, the batch-means SE over complete
    # windows of 25 steps (80 steps: 3 windows), and the interval mean +- 1.96 SE.
    last = {key: cols[f"gradsim/{key}/parity"][-1][1] for key in ("cos_mean", "cos_se", "noise_decided")}
    assert rep.mean == pytest.approx(last["cos_mean"], abs=1e-12) and rep.mean == pytest.approx(mean, abs=1e-6)
    window_means = [sum(cos[w * 25 : (w + 1) * 25]) / 25 for w in range(3)]
    wm = sum(window_means) / 3
    se = (sum((x - wm) ** 2 for x in window_means) / 2) ** 0.5 / 3**0.5
    assert last["cos_se"] == pytest.approx(se, rel=1e-5)
    assert (rep.low, rep.high) == pytest.approx((rep.mean - 1.96 * se, rep.mean + 1.96 * se), abs=1e-5)
    q = n // 4
    assert rep.early[0] == pytest.approx(sum(cos[:q]) / q) and rep.late[0] == pytest.approx(sum(cos[-q:]) / q)
    # the gate's own count (the last logged open_fraction) = the mean of the logged decisions (every step logged)
    opened = [v for _, v in cols["gradsim/gate_open/parity"]]
    assert rep.open_fraction == cols["gradsim/open_fraction/parity"][-1][1]
    assert rep.open_fraction == pytest.approx(sum(opened) / n)
    assert rep.open_fraction == pytest.approx(float(model.gradsim.open_fraction()[0]))
    assert rep.weight == pytest.approx(sum(v for _, v in cols["gradsim/weight/parity"]) / n)
    # decided by noise (the gate's count, logged): the cosine the rule used (the EMA) within 2 SE of 0, the SE
    # including the step (none at the first step; naive s / sqrt(n) until two windows of 25 are complete)
    smoothed = [v for _, v in cols["gradsim/cos_smoothed/parity"]]

    def se_at(t: int) -> float:
        c = cos[: t + 1]
        if t == 0:
            return 2.0
        full = (t + 1) // 25
        if full >= 2:
            means = [sum(c[w * 25 : (w + 1) * 25]) / 25 for w in range(full)]
            m = sum(means) / full
            return (sum((x - m) ** 2 for x in means) / (full - 1)) ** 0.5 / full**0.5
        m = sum(c) / len(c)
        return (sum((x - m) ** 2 for x in c) / (len(c) - 1)) ** 0.5 / len(c) ** 0.5

    noisy = [abs(smoothed[t]) < 2 * se_at(t) for t in range(n)]
    assert rep.noise == pytest.approx(last["noise_decided"]) and rep.noise == pytest.approx(sum(noisy) / n)
    assert 0 < rep.noise < 1
    # TensorBoard stores float32: the same run, the same numbers to float32 precision
    tb = by_source["tensorboard"]
    assert (tb.n, tb.open_fraction, tb.weight) == (rep.n, rep.open_fraction, rep.weight)
    assert (tb.mean, tb.low, tb.high) == pytest.approx((rep.mean, rep.low, rep.high), abs=1e-6)
    assert tb.reading == rep.reading
    assert f"{rep.mean:.3f} [{rep.low:.3f}, {rep.high:.3f}]" in text


def test_csv_beside_tensorboard_events_is_read_once_and_transfer_csv(digits_run, tmp_path):
    import shutil

    root, _ = digits_run
    both = tmp_path / "both"
    shutil.copytree(root / "tb" / "version_0", both)  # a CSVLogger and a TensorBoardLogger sharing a folder
    shutil.copy(root / "csv" / "version_0" / "metrics.csv", both / "metrics.csv")
    reports, files = write_report(both, tmp_path / "out")
    assert [r.source for r in reports] == ["csv"]
    assert "TensorBoard events skipped" in (tmp_path / "out" / "transfer.md").read_text()
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["cos_mean"]) == reports[0].mean
    assert rows[0]["reading"] == reports[0].reading and float(rows[0]["noise_decided"]) == reports[0].noise


def test_from_arrays_equals_the_same_numbers_from_a_log(tmp_path):
    from lightning_gradsim.experiments.report import task_report
    from lightning_gradsim.experiments.report_logs import RunLog

    steps, cos = np.arange(0, 300, 3), 0.1 + centred_noise(100, 0.2, 8)
    opened = (cos > 0).astype(float)
    from_log = read_one(tmp_path, steps, {"gradsim/cos/aux": cos, "gradsim/gate_open/aux": opened})
    direct = task_report(RunLog.from_arrays("mem", "aux", steps, cos, gate_open=opened), "aux")
    assert (direct.mean, direct.low, direct.high, direct.noise) == pytest.approx(
        (from_log.mean, from_log.low, from_log.high, from_log.noise)
    )
    assert direct.reading == from_log.reading
    assert direct.open_fraction == pytest.approx(opened.mean())
    with pytest.raises(ValueError, match="Unknown keys"):
        RunLog.from_arrays("mem", "aux", steps, cos, gate=opened)


def test_running_se_equals_batch_means_of_each_prefix():
    values = np.random.default_rng(3).normal(size=57)
    se = running_se(values)
    assert np.isnan(se[:3]).all()
    for t in (3, 4, 10, 39, 40, 56):
        assert se[t] == pytest.approx(windows_by_hand(list(values[: t + 1]), min(20, (t + 1) // 2)))


def write_csv_log(folder, steps, columns):
    """A metrics.csv as Lightning's CSVLogger writes it (a step column, one column per metric)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["step", *columns]
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for i, step in enumerate(steps):
            writer.writerow([step, *(columns[c][i] for c in columns)])
        writer.writerow([len(steps), *([""] * len(columns))])  # a row of other metrics: blanks here


def read_one(tmp_path, steps, columns, threshold=0.0):
    write_csv_log(tmp_path / "logs", steps, columns)
    reports, _ = write_report(tmp_path / "logs", tmp_path / "out", threshold=threshold)
    assert len(reports) == 1
    return reports[0]


def centred_noise(n, scale, seed):
    """Noise with mean exactly 0 (up to float sums): a window-mean spread of about scale / sqrt(window)."""
    e = np.random.default_rng(seed).normal(0.0, scale, n)
    return e - e.mean()


def test_reading_conflict_after_step_n(tmp_path):
    steps = np.arange(600)
    cos = np.where(steps < 300, 0.4, -0.3) + centred_noise(600, 0.1, 0)
    rep = read_one(tmp_path, steps, {"gradsim/cos/aux": cos})
    assert rep.reading.startswith("conflict after step ") and 295 <= rep.change_step <= 305
    assert rep.reading == f"conflict after step {rep.change_step}"


def test_reading_positive_after_step_n_with_logging_interval(tmp_path):
    steps = np.arange(0, 2000, 5)  # GradSimMonitor(logging_interval=5): every fifth step
    cos = np.where(steps < 700, -0.3, 0.3) + centred_noise(400, 0.1, 1)
    rep = read_one(tmp_path, steps, {"gradsim/cos/aux": cos})
    assert rep.reading.startswith("positive transfer after step ") and 680 <= rep.change_step <= 720


def test_reading_throughout_undecided_and_threshold(tmp_path):
    steps = np.arange(400)
    assert read_one(tmp_path / "a", steps, {"gradsim/cos/aux": 0.2 + centred_noise(400, 0.1, 2)}).reading == (
        "positive transfer throughout"
    )
    assert read_one(tmp_path / "b", steps, {"gradsim/cos/aux": -0.2 + centred_noise(400, 0.1, 3)}).reading == (
        "conflict throughout"
    )
    rep = read_one(tmp_path / "c", steps, {"gradsim/cos/aux": centred_noise(400, 0.3, 4)})
    assert rep.reading == "undecided: the cosine is within noise of the threshold"
    assert rep.low < 0 < rep.high
    # positive, but below the gate's threshold: conflict relative to it
    rep = read_one(tmp_path / "d", steps, {"gradsim/cos/aux": 0.1 + centred_noise(400, 0.05, 5)}, threshold=0.3)
    assert rep.reading == "conflict throughout" and rep.mean == pytest.approx(0.1)


def test_reading_fading_transfer_and_too_few_steps(tmp_path):
    steps = np.arange(400)
    # positive for 3/4 of the run, then centred on 0: overall positive, the last quarter within noise
    cos = np.concatenate([0.3 + centred_noise(300, 0.2, 6), centred_noise(100, 0.2, 7)])
    rep = read_one(tmp_path / "a", steps, {"gradsim/cos/aux": cos})
    assert rep.reading == "positive transfer overall; first quarter: positive, last quarter: within noise"
    rep = read_one(tmp_path / "b", np.arange(10), {"gradsim/cos/aux": np.full(10, 0.5)})
    assert rep.reading == "too few logged steps to read (n = 10 < 20)"


def test_logged_cos_se_and_noise_decided_are_used_when_present(tmp_path):
    steps = np.arange(100)
    cos = 0.3 + centred_noise(100, 0.05, 7)  # by batch means alone: clearly positive
    columns = {
        "gradsim/cos/aux": cos,
        "gradsim/cos_mean/aux": np.full(100, 0.3),
        "gradsim/cos_se/aux": np.full(100, 0.2),  # the gate says: very uncertain
        "gradsim/noise_decided/aux": np.linspace(1.0, 0.25, 100),
        "gradsim/other.gate/cos/aux": cos,  # a second gate's task is its own row
    }
    reports, _ = write_report(*_write(tmp_path, steps, columns))
    rep = next(r for r in reports if r.task == "aux")
    assert (rep.mean, rep.se) == (0.3, 0.2) and (rep.low, rep.high) == pytest.approx((0.3 - 0.392, 0.3 + 0.392))
    assert rep.se_source == "the gate's logged cos_se" and rep.noise == 0.25
    assert rep.reading == "undecided: the cosine is within noise of the threshold"
    other = next(r for r in reports if r.task == "other.gate/aux")
    assert other.reading == "positive transfer throughout" and other.se_source == "batch means (20 windows)"


def _write(tmp_path, steps, columns):
    write_csv_log(tmp_path / "logs", steps, columns)
    return tmp_path / "logs", tmp_path / "out"


@pytest.mark.slow
def test_report_reads_compare_and_table1_outputs(tmp_path):
    from lightning_gradsim.experiments.compare import compare

    compare(
        "rotated_digits",
        methods=["unweighted"],
        seeds=[0],
        options={"max_images": 300, "batch_size": 16},
        max_steps=30,
        eval_every=30,
        out_dir=tmp_path / "cmp",
        progress=False,
    )
    assert gradsim(["table1", "--source", "digits", "--angles", "0", "--methods", "unweighted", "--seeds", "1",
                    "--epochs", "3", "--out", str(tmp_path / "t1"), "--no-progress"]) == 0  # fmt: skip
    reports, _ = write_report(tmp_path, tmp_path / "out")
    cmp = next(r for r in reports if r.source == "compare")
    run = json.loads((tmp_path / "cmp" / "result.json").read_text())["runs"][0]
    assert cmp.n == 30 and cmp.mean == pytest.approx(np.mean(run["cos"]["rotated"]))
    assert cmp.open_fraction == pytest.approx(np.mean(run["gradsim"]["gradsim/gate_open/rotated"]))
    t1 = next(r for r in reports if r.source == "table1")
    row = json.loads((tmp_path / "t1" / "result.json").read_text())["rows"][0]
    assert t1.unit == "epoch" and t1.n == 3 and t1.noise is None and t1.weight is None
    assert t1.mean == pytest.approx(row["mean_cosine"], abs=1e-5) and t1.open_fraction == row["open_fraction"]
    assert t1.reading == "too few logged epochs to read (n = 3 < 20)"


def test_argument_errors_are_one_line(tmp_path, capsys):
    assert gradsim(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "empty").mkdir()
    assert gradsim(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no GradSimMonitor metrics" in err and err.strip().count("\n") == 0
    (tmp_path / "afile").write_text("x")
    write_csv_log(tmp_path / "logs", np.arange(30), {"gradsim/cos/aux": np.full(30, 0.5)})
    assert gradsim(["report", str(tmp_path / "logs"), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err
    assert gradsim(["report", str(tmp_path / "logs"), "--out", str(tmp_path / "o"), "--windows", "1"]) == 2


def test_tensorboard_missing_is_one_clear_line(digits_run, tmp_path, capsys, monkeypatch):
    import sys

    root, _ = digits_run
    for name in ("tensorboard", "tensorboard.backend.event_processing.event_accumulator"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (also when imported already)
    assert gradsim(["report", str(root / "tb"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs the package 'tensorboard'" in err and "lightning-gradsim[experiments]" in err
    assert err.strip().count("\n") == 0
    assert gradsim(["report", str(root / "csv"), "--out", str(tmp_path / "o")]) == 0  # CSV needs no tensorboard
    assert gradsim(["report", str(root), "--out", str(tmp_path / "both")]) == 0  # the CSV run, and a note
    assert "tb/version_0): they need the package 'tensorboard'" in (tmp_path / "both" / "transfer.md").read_text()
