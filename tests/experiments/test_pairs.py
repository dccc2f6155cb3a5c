"""``gradsim pairs`` (paper 4.1, Figure 3): pair picking, the binary tasks, the stacked trainer, the command."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradsim.cli import main as gradsim
from lightning_gradsim.experiments.pair_select import pick_pairs
from lightning_gradsim.experiments.pairs_data import load_mnist, mnist_pair
from lightning_gradsim.experiments.stacked import Run, StackedRuns
from lightning_gradsim.methods import make_gate
from lightning_gradsim.models import MultiHeadNet

from .._imagenet_fixtures import make_image_folder


def _exact_gaussian(mu: list[float], sigma: float, n: int, seed: int) -> torch.Tensor:
    """``n`` samples whose sample mean is exactly ``mu`` and sample covariance exactly ``sigma^2 I``."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(z.T))
    z = z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # whitened: sample covariance = I
    return torch.tensor(mu, dtype=torch.float64) + sigma * z


def test_pick_pairs_on_gaussians_with_known_distances():
    # Fréchet distance of N(m1, s1^2 I) and N(m2, s2^2 I) in D dims: |m1 - m2|^2 + D (s1 - s2)^2
    spec = {
        "a": ([0, 0, 0], 1.0),
        "b": ([0.5, 0, 0], 1.0),
        "c": ([0, 3, 0], 2.0),
        "d": ([10, 0, 0], 1.0),
        "e": ([0, 0, -4], 0.5),
    }
    feats = {c: _exact_gaussian(mu, s, 300, i) for i, (c, (mu, s)) in enumerate(spec.items())}
    truth = {}
    for (ca, (ma, sa)), (cb, (mb, sb)) in itertools.combinations(spec.items(), 2):
        truth[(ca, cb)] = (
            float(((torch.tensor(ma, dtype=torch.float64) - torch.tensor(mb, dtype=torch.float64)) ** 2).sum())
            + 3 * (sa - sb) ** 2
        )
    choice = pick_pairs(feats)
    for pair, value in truth.items():
        assert choice.distances[pair] == pytest.approx(value, rel=1e-7, abs=1e-7)
    assert choice.near == min(truth, key=truth.get) == ("a", "b")
    assert choice.far == max(truth, key=truth.get) == ("d", "e")
    # deterministic, whatever the order the classes come in
    again = pick_pairs(dict(reversed(list(feats.items()))))
    assert (again.near, again.far, again.distances) == (choice.near, choice.far, choice.distances)
    # ties go to the first pair in sorted class order; digits sort as numbers. The tie is exact by
    # construction, not by rounding: the four pairs of an "a" class with a "d" class compute the same
    # function of the same two tensors in the same order (bitwise equal), and are far apart from the
    # two pairs of equal classes (distance 0 up to rounding), so no floating-point tie decides.
    tied = {"2": feats["a"], "3": feats["a"], "4": feats["d"], "10": feats["d"]}
    distances = pick_pairs(tied).distances
    far_pairs = [("2", "4"), ("2", "10"), ("3", "4"), ("3", "10")]
    assert len({distances[p] for p in far_pairs}) == 1 and distances[("2", "4")] > 50
    assert pick_pairs(tied).far == ("2", "4")  # the first of the four in numeric order ("10" sorts last)
    assert pick_pairs(dict(reversed(list(tied.items())))).far == ("2", "4")  # whatever the input order
    with pytest.raises(ValueError, match="at least 3 classes"):
        pick_pairs({"a": feats["a"], "b": feats["b"]})


def test_mnist_pair_tasks(mnist_root):
    x_tr, y_tr, x_te, y_te, note = load_mnist(mnist_root)
    assert (len(y_tr), len(y_te)) == (8000, 2000) and "split once" in note
    pair = mnist_pair(x_tr, y_tr, x_te, y_te, "4", "9", kind="near", max_per_class=60)
    for task, positive, pool_x, pool_y in (
        ("main", "4", x_tr, y_tr),
        ("aux", "9", x_tr, y_tr),
        ("test", "4", x_te, y_te),
    ):
        t = getattr(pair, task)
        # the images are the source's, with their true classes
        assert torch.equal(t.x, pool_x[torch.as_tensor(t.source_index)])
        assert (t.classes == pool_y[torch.as_tensor(t.source_index)].numpy().astype(str)).all()
        # label 1 exactly on the task's class; negatives are neither 4 nor 9, as many as positives,
        # every other digit present
        assert torch.equal(t.y, torch.as_tensor(t.classes == positive).long())
        negatives = t.classes[t.y.numpy() == 0]
        assert not set(negatives) & {"4", "9"} and len(negatives) == int(t.y.sum())
        assert set(negatives) == {str(d) for d in range(10)} - {"4", "9"}
        counts = np.unique(negatives, return_counts=True)[1]
        assert counts.max() - counts.min() <= 1
    # the two tasks draw their own images: no training image is in both
    assert not set(pair.main.source_index) & set(pair.aux.source_index[pair.aux.y.numpy() == 1])


def _small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return MultiHeadNet(trunk, 4, {"main": 2, "aux": 2})


def test_stacked_runs_equal_separate_runs():
    methods = ("main_only", "sum", "unweighted")
    runs = [Run(g, s, m) for g in (0, 1) for s in (0, 1) for m in methods]
    stack = StackedRuns(_small_net, runs, lr=1e-2)
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(8):  # every method of a (group, seed) gets the same batches
        step = {}
        for task in ("main", "aux"):
            per_key = {
                (gr, s): (torch.randn(6, 1, 8, 8, generator=g), torch.randint(2, (6,), generator=g))
                for gr in (0, 1)
                for s in (0, 1)
            }
            step[task] = tuple(torch.stack([per_key[(r.group, r.seed)][k] for r in runs]) for k in (0, 1))
        steps.append(step)
    stats = [stack.step(s["main"], s["aux"]) for s in steps]
    x_test, y_test = torch.randn(20, 1, 8, 8, generator=g), torch.randint(2, (20,), generator=g)
    acc = stack.accuracy(x_test, y_test)
    finals = {}
    for r, run in enumerate(runs):
        net, gate = _small_net(run.seed), make_gate(run.method)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for i, s in enumerate(steps):
            opt.zero_grad()
            main_loss = F.cross_entropy(net(s["main"][0][r], "main"), s["main"][1][r])
            aux_loss = F.cross_entropy(net(s["aux"][0][r], "aux"), s["aux"][1][r])
            ref = gate.backward(main_loss, {"aux": aux_loss}, net.trunk.parameters())
            opt.step()
            assert float(stats[i].cosine[r]) == pytest.approx(float(ref.cosine[0]), abs=1e-5)
            # the decision is compared only where rounding cannot decide it: no cosine within 1e-3 of 0
            assert abs(float(ref.cosine[0])) > 1e-3
            assert bool(stats[i].gate_open[r]) == bool(ref.gate_open[0])
        for name, p in net.named_parameters():
            torch.testing.assert_close(stack.params[name][r], p.detach(), atol=1e-5, rtol=1e-5)
        for name, b in net.named_buffers():
            torch.testing.assert_close(stack.buffers[name][r], b, atol=1e-5, rtol=1e-5)
        net.eval()
        logits = net(x_test).detach()
        # no prediction is a near tie (which the stacked run's rounding could break the other way)
        assert float((logits[:, 0] - logits[:, 1]).abs().min()) > 1e-3
        assert float(acc[r]) == pytest.approx(float((logits.argmax(-1) == y_test).double().mean()))
        finals[run] = net.trunk[0].weight.detach()
    # the methods really differ (the test could fail): sum != main_only, and the gate both opened and closed
    assert not torch.allclose(finals[Run(0, 0, "sum")], finals[Run(0, 0, "main_only")], atol=1e-4)
    opened = torch.stack([s.gate_open for s in stats])[:, [i for i, r in enumerate(runs) if r.method == "unweighted"]]
    assert opened.any() and not opened.all()
    assert torch.stack([s.gate_open for s in stats])[:, [i for i, r in enumerate(runs) if r.method == "sum"]].all()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_pairs_command_mnist(mnist_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = gradsim(
        [
            "pairs",
            "--source",
            "mnist",
            "--root",
            str(mnist_root),
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--seeds",
            "2",
            "--max-per-class",
            "40",
            "--batch-size",
            "8",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = _rows(out / "curves.csv")
    assert list(rows[0])[:7] == ["pair", "kind", "method", "seed", "step", "test_accuracy", "cosine"]
    assert len(rows) == 2 * 3 * 2 * 3  # pairs x methods x seeds x evaluations (steps 0, 3, 6)
    # picked by the Fréchet distance of pixel features on the 8,000 training images: 4/9 nearest, 0/1 farthest
    assert {(r["kind"], r["pair"]) for r in rows} == {("near", "digit 4 / digit 9"), ("far", "digit 0 / digit 1")}
    # at step 0 every method of a seed is the same network: same accuracy; no cosine yet
    for kind, seed in itertools.product(("near", "far"), ("0", "1")):
        start = [r for r in rows if r["kind"] == kind and r["seed"] == seed and r["step"] == "0"]
        assert len({r["test_accuracy"] for r in start}) == 1 and all(r["cosine"] == "" for r in start)
    assert all(-1 <= float(r["cosine"]) <= 1 for r in rows if r["step"] != "0")
    assert len(_rows(out / "cosine_steps.csv")) == 6 * 12
    assert (out / "figure3.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "Fréchet distance of `pixels`" in summary and "Wall time" in summary and "split once" in summary


@pytest.mark.slow
def test_pairs_command_imagefolder(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imagenet", n_train=6, n_val=2, size=16)
    out = tmp_path / "out"
    # the default model (timm resnetv2_18, BatchNorm buffers stacked) is slow on CPU: two runs, two steps
    code = gradsim(
        [
            "pairs",
            "--root",
            str(root),
            "--image-size",
            "16",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--seeds",
            "1",
            "--batch-size",
            "4",
            "--methods",
            "unweighted",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = _rows(out / "curves.csv")
    # the paper's default pairs, by name
    assert {(r["kind"], r["pair"]) for r in rows} == {
        ("near", "trimaran / catamaran"),
        ("far", "traffic light / rock python"),
    }
    assert len(rows) == 2 * 3 and "model=resnetv2_18" in (out / "summary.md").read_text()
    # near: trimaran positives; negatives from the four classes that are neither trimaran nor catamaran
    assert (
        "near pair: main 'trimaran' (n04483307) vs aux 'catamaran' (n02981792); 12 main / 12 aux training images"
        in printed
    )
    assert (out / "figure3.png").is_file()
    assert gradsim(["pairs", "--source", "downsampled", "--root", str(root), "--out", str(out)]) == 2
    assert "map_file" in capsys.readouterr().err


def test_stacked_heldout_runs_equal_separate_runs():
    """Held-out gates in the stacked trainer equal gate.backward(..., reference_loss=...) run alone on the
    same batches (the reference forward in train mode, the BatchNorm running statistics left as they were)."""
    methods = ("unweighted", "unweighted_heldout", "weighted_heldout")
    runs = [Run(g, s, m) for m in methods for g in (0, 1) for s in (0, 1)]
    stack = StackedRuns(_small_net, runs, lr=1e-2)
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(6):
        step = {}
        for task in ("main", "aux", "reference"):
            per_key = {
                (gr, s): (torch.randn(6, 1, 8, 8, generator=g), torch.randint(2, (6,), generator=g))
                for gr in (0, 1)
                for s in (0, 1)
            }
            step[task] = tuple(torch.stack([per_key[(r.group, r.seed)][k] for r in runs]) for k in (0, 1))
        steps.append(step)
    with pytest.raises(ValueError, match="reference"):
        stack.step(steps[0]["main"], steps[0]["aux"])
    stats = [stack.step(s["main"], s["aux"], s["reference"]) for s in steps]
    for r, run in enumerate(runs):
        net, gate = _small_net(run.seed), make_gate(run.method.removesuffix("_heldout"))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for i, s in enumerate(steps):
            opt.zero_grad()
            main_loss = F.cross_entropy(net(s["main"][0][r], "main"), s["main"][1][r])
            aux_loss = F.cross_entropy(net(s["aux"][0][r], "aux"), s["aux"][1][r])
            ref_loss, saved = None, {n: b.clone() for n, b in net.named_buffers()}
            if run.method.endswith("_heldout"):
                ref_loss = F.cross_entropy(net(s["reference"][0][r], "main"), s["reference"][1][r])
            ref = gate.backward(main_loss, {"aux": aux_loss}, net.trunk.parameters(), reference_loss=ref_loss)
            for n, b in net.named_buffers():  # the reference forward leaves the running statistics alone
                b.copy_(saved[n])
            opt.step()
            assert float(stats[i].cosine[r]) == pytest.approx(float(ref.cosine[0]), abs=1e-5)
            assert bool(stats[i].gate_open[r]) == bool(ref.gate_open[0])
        for name, p in net.named_parameters():
            torch.testing.assert_close(stack.params[name][r], p.detach(), atol=1e-5, rtol=1e-5)
        for name, b in net.named_buffers():
            torch.testing.assert_close(stack.buffers[name][r], b, atol=1e-5, rtol=1e-5)
    # at step 1 every method of a (group, seed) has the same weights and batches: the held-out cosine differs
    plain, held = stats[0].cosine[:4], stats[0].cosine[4:8]
    assert (plain - held).abs().min() > 1e-3
