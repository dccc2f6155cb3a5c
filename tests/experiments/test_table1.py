"""``gradsim table1`` (paper 4.2): the protocol's facts, the stacked trainer against separate runs, outputs."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradsim import GradientGate
from lightning_gradsim.data import REFERENCE_FRACTION
from lightning_gradsim.data.table1 import load_table1_data, rotated_views, split_test_file, task_batch
from lightning_gradsim.experiments.heldout import ReferenceOrder, base_method
from lightning_gradsim.experiments.paired import paired_t_test, student_t_sf
from lightning_gradsim.experiments.stacked_mlp import StackedMLP, init_run_parameters
from lightning_gradsim.experiments.stacked_training import RunGroup, RunOrder, StackedTrainer
from lightning_gradsim.experiments.table1 import (
    DEFAULT_METHODS,
    Table1Config,
    build_protocol,
    main,
    parse_method,
    run_table1,
)
from lightning_gradsim.experiments.table1_report import error_table
from lightning_gradsim.methods import make_gate


@pytest.fixture(scope="module")
def digits():
    return load_table1_data("digits")


# ----------------------------------------------------------------------------- the data
def test_rotation_is_counter_clockwise_and_exact_for_right_angles():
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 1, 6] = 1.0  # row 1, column 6 (top right)
    views = rotated_views(img, [0, 90, 180, 270]).view(4, 8, 8)
    # counter-clockwise by 90: (r, c) -> (W-1-c, r); by 180: (H-1-r, W-1-c)
    assert views[0, 1, 6] == 1 and views[1, 8 - 1 - 6, 1] == 1 and views[2, 6, 1] == 1 and views[3, 6, 6] == 1
    assert all(v.sum() == 1 for v in views)


def test_rotation_by_45_degrees_moves_the_centroid_on_the_circle():
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 13:15, 21:23] = 1.0  # a blob right of the centre (13.5, 13.5), at distance 8
    out = rotated_views(img, [45]).view(28, 28)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    r, c = (out * rows).sum() / out.sum(), (out * cols).sum() / out.sum()
    # counter-clockwise on screen: up (smaller row) and left
    assert r.item() == pytest.approx(13.5 - 8 / math.sqrt(2), abs=0.3)
    assert c.item() == pytest.approx(13.5 + 8 / math.sqrt(2), abs=0.3)


def test_auxiliary_images_are_the_same_images_rotated(digits):
    angles = [0.0, 90.0, 180.0]
    views = rotated_views(digits.train_x, angles)
    task_view = torch.tensor([[0, 0], [0, 1], [0, 2]])
    idx = torch.stack([torch.randperm(len(digits.train_y))[:16] for _ in range(3)])
    x, y = task_batch(views, digits.train_y, task_view, idx)
    main = x[:, 0].view(3, 16, 8, 8)
    aux = x[:, 1].view(3, 16, 8, 8)
    for r in range(3):
        assert torch.equal(main[r], digits.train_x[idx[r], 0])  # the main task reads the originals
        assert torch.equal(y[r, 0], digits.train_y[idx[r]]) and torch.equal(y[r, 1], y[r, 0])  # same labels
    assert torch.equal(aux[0], main[0])
    assert torch.equal(aux[1], torch.rot90(main[1], 1, dims=(-2, -1)))
    assert torch.equal(aux[2], main[2].flip(-1).flip(-2))


def test_mnist_10k_file_split_is_fixed_and_disjoint(mnist_root):
    a = load_table1_data("mnist", mnist_root)
    b = load_table1_data("mnist", mnist_root)
    assert len(a.train_y) == 8000 and len(a.test_y) == 2000
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert "8,000/2,000" in a.note and "10k test file" in a.description
    tr, te = split_test_file(10000, 8000, 0)
    assert set(tr.tolist()).isdisjoint(te.tolist()) and len(set(tr.tolist()) | set(te.tolist())) == 10000
    # the images are those of the file at those indices: no test image is a training image
    train_flat = a.train_x.flatten(1)
    test_flat = a.test_x[:200].flatten(1)
    assert (torch.cdist(test_flat, train_flat).min(1).values > 0).all()
    assert tuple(a.train_x.shape[1:]) == (1, 28, 28) and float(a.train_x.max()) == 1.0


def test_mnist_needs_a_root_and_reports_missing_files(tmp_path):
    with pytest.raises(ValueError, match="--root"):
        load_table1_data("mnist", None)
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_table1_data("mnist", tmp_path)


# ----------------------------------------------------------------------------- the stacked trainer
class _Run(nn.Module):
    def __init__(self, seed, input_dim, hidden, depth):
        super().__init__()
        params = init_run_parameters(seed, input_dim, hidden, depth)
        layers = []
        for w, b in params[:depth]:
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data.copy_(w), lin.bias.data.copy_(b)
            layers += [lin, nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList()
        for w, b in params[depth:]:
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data.copy_(w), lin.bias.data.copy_(b)
            self.heads.append(lin)


def _reference_run(method, seed, data_x, data_y, angle_k, steps, batch, lr, gate_kwargs, hidden, depth):
    """One run trained alone: nn.Linear modules, autograd, torch.optim.RMSprop; rotation by torch.rot90."""
    net = _Run(seed, data_x[0].numel(), hidden, depth)
    opt = torch.optim.RMSprop(net.parameters(), lr=lr)
    spec = parse_method(method)
    gate = make_gate(spec.method, **{**gate_kwargs, **spec.options}) if method not in ("main_only", "sum") else None
    order = RunOrder([seed], len(data_y))
    done = 0
    while done < steps:
        idx = order.epoch()[0]
        for k in range(0, len(idx), batch):
            if done == steps:
                break
            bi = idx[k : k + batch]
            x = data_x[bi]
            x_rot = torch.rot90(x, angle_k, dims=(-2, -1))
            opt.zero_grad()
            h_main, h_aux = net.trunk(x.flatten(1)), net.trunk(x_rot.flatten(1))
            loss_main = F.cross_entropy(net.heads[0](h_main), data_y[bi])
            if method == "main_only":  # the auxiliary head learns, the trunk does not see it
                (loss_main + F.cross_entropy(net.heads[1](h_aux.detach()), data_y[bi])).backward()
            elif method == "sum":
                (loss_main + F.cross_entropy(net.heads[1](h_aux), data_y[bi])).backward()
            else:
                loss_aux = F.cross_entropy(net.heads[1](h_aux), data_y[bi])
                gate.backward(loss_main, {"rotated": loss_aux}, net.trunk.parameters())
            opt.step()
            done += 1
    return net


def _stacked_params(model, r):
    out = []
    for layer in range(model.depth):
        out += [model.trunk[2 * layer][r].T, model.trunk[2 * layer + 1][r]]
    for t in range(2):
        out += [model.heads[0][r, t].T, model.heads[1][r, t]]
    return out


def _reference_params(net):
    out = list(net.trunk.parameters())
    for head in net.heads:
        out += [head.weight, head.bias]
    return out


@pytest.mark.parametrize(
    "methods, gate_kwargs",
    [
        (["main_only", "sum", "unweighted"], {}),
        # threshold 0.2: the smoothed cosines start at 0.07-0.42, so the gate closes on some runs
        (["unweighted", "weighted"], {"threshold": 0.2, "cosine_ema": 0.8, "per_layer": True}),
        # GradVac's targets, DWA's loss history (2 steps a period) are per run; torchjd runs per run
        (["gradvac:beta=0.3", "dwa:period=2", "torchjd:UPGrad"], {}),
        # per tensor: the stacked runs hand the gate each tensor's gradients, not one flat vector
        (["gradvac:beta=0.3:per_tensor=true"], {}),
    ],
)
def test_stacked_runs_equal_separate_runs(digits, methods, gate_kwargs):
    """Every stacked run (methods x angles x seeds) equals the same run trained alone."""
    x, y = digits.train_x[:300], digits.train_y[:300]
    hidden, depth, batch, lr, steps = 16, 2, 64, 3e-3, 7  # 5 steps per epoch: crosses an epoch boundary
    seeds, angle_ks = [0, 1], [0, 1]
    cfg = Table1Config(
        source="digits",
        angles=[90.0 * k for k in angle_ks],
        methods=methods,
        seeds=len(seeds),
        epochs=1,
        batch_size=batch,
        lr=lr,
        hidden=hidden,
        depth=depth,
        **gate_kwargs,
    )
    data = type(digits)(x, y, digits.test_x, digits.test_y, "digits", "subset")
    proto = build_protocol(cfg, data)
    from lightning_gradsim.data.table1 import task_batch as tb

    done, records = 0, []
    while done < steps:
        idx = proto.order.epoch()
        for k in range(0, idx.shape[1], batch):
            if done == steps:
                break
            records.append(proto.trainer.step(*tb(proto.views, proto.train_y, proto.task_view, idx[:, k : k + batch])))
            done += 1
    gate_open = torch.stack([rec.gate_open[:, 0] for rec in records])  # (steps, runs)
    # The stacked einsum and nn.Linear sum in different orders: float32 rounding, measured at most 1.8e-5
    # (0.006 lr) on any element after 7 RMSprop steps, 3e-7 on average. RMSprop's step lr g / sqrt(v) does
    # not shrink with g, so a near-zero gradient whose sign the rounding flipped would move its element by
    # ~lr and fail this check: atol is a fifth of lr, ten times the measured rounding.
    atol, closed = 0.2 * lr, set()
    for r, (mi, angle, seed) in enumerate(proto.runs):
        run = (methods[mi], seed, x, y, int(angle // 90), steps, batch, lr, gate_kwargs, hidden, depth)
        ref = _reference_run(*run)
        for got, want in zip(_stacked_params(proto.model, r), _reference_params(ref)):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=atol)
            assert (got - want.detach()).abs().mean() < 1e-6
        if methods[mi] in ("main_only", "sum") or bool(gate_open[:, r].all()):
            continue
        # where the gate closed, the comparison can fail: the same run with the auxiliary loss always
        # added ("sum") ends elsewhere
        closed.add(methods[mi])
        summed = _reference_params(_reference_run("sum", *run[1:]))
        gap = max(float((g.detach() - s.detach()).abs().max()) for g, s in zip(_stacked_params(proto.model, r), summed))
        assert gap > 5 * atol
    # every cosine-gated method closed on some run and step (a loss weighting and UPGrad have no gate to close)
    assert closed == {m for m in methods if m.split(":")[0] in ("unweighted", "weighted", "projection", "gradvac")}


def test_stacked_loss_weighting_scales_each_run_by_its_own_weights():
    """RLW over stacked runs: each run's trunk gradient is w_main g_main + w_aux lambda g_aux and its heads'
    gradients are scaled by their task's weight, each run's draw from RLW's stream keyed by the run's seed."""
    from lightning_gradsim.loss_weighting import RLW

    torch.manual_seed(0)
    model = StackedMLP([3, 4, 5], input_dim=12, hidden=8, depth=2)
    gate = make_gate("rlw", seed=7, aux_weight=0.5)
    trainer = StackedTrainer(model, [RunGroup("rlw", gate, slice(0, 3))])
    x, y = torch.randn(3, 2, 10, 12), torch.randint(0, 10, (3, 2, 10))
    grads = model.task_gradients(x, y)
    trunk = [g.clone() for g in grads.trunk]
    heads = [h.clone() for h in grads.heads]
    w = RLW(seed=7).batched_weights((3,), 2, torch.zeros(()), keys=[3, 4, 5]) * torch.tensor([1.0, 0.5])
    trainer.step(x, y)
    for p, g in zip(trainer._trunk_views[0], trunk):
        want = (
            w[:, 0].reshape((3,) + (1,) * (g.dim() - 2)) * g[:, 0]
            + w[:, 1].reshape((3,) + (1,) * (g.dim() - 2)) * g[:, 1]
        )
        torch.testing.assert_close(p.grad, want)
    for p, h in zip(trainer._head_views, heads):
        torch.testing.assert_close(p.grad, w.reshape(w.shape + (1,) * (h.dim() - 2)) * h)
    assert int(gate.loss_weighting.draws) == 2 and gate.loss_weighting.task_weights.shape == (3, 2)


def test_a_run_does_not_depend_on_what_else_is_stacked(digits):
    """Bitwise (one machine, one process): a subset of the runs trained alone equals the same runs
    inside the full stack -- parameters, per-epoch cosines and losses, gate statistics, test errors."""
    data = type(digits)(digits.train_x[:640], digits.train_y[:640], digits.test_x, digits.test_y, "digits", "subset")
    common = dict(source="digits", seeds=3, epochs=2, batch_size=64, hidden=100, depth=3, progress=False)
    full = build_protocol(Table1Config(angles=[0, 45, 90, 135, 180], **common), data)  # 4 methods x 5 x 3 = 60
    sub = build_protocol(Table1Config(angles=[90, 45], methods=["weighted", "sum"], **common), data)
    where = _train_both_and_compare(full, sub)
    test_x = data.test_x.reshape(len(data.test_y), -1)
    assert torch.equal(full.model.error(test_x, data.test_y)[where], sub.model.error(test_x, data.test_y))
    open_full = torch.cat([g.gate.open_fraction().reshape(-1) for g in full.trainer.groups])
    open_sub = torch.cat([g.gate.open_fraction().reshape(-1) for g in sub.trainer.groups])
    assert torch.equal(open_full[where], open_sub)


def test_stateful_and_random_methods_runs_do_not_depend_on_what_else_is_stacked(digits):
    """The same for methods with per-run state (DWA's loss history, GradVac's targets) and random ones (RLW's
    weights, PCGrad's orders): their draws are keyed by the run's seed, not its place in the group."""
    data = type(digits)(digits.train_x[:384], digits.train_y[:384], digits.test_x, digits.test_y, "digits", "subset")
    common = dict(source="digits", seeds=2, epochs=2, batch_size=64, hidden=16, depth=2, progress=False)
    methods = ["dwa", "gradvac", "pcgrad", "rlw"]
    full = build_protocol(Table1Config(angles=[0, 45, 90], methods=methods, **common), data)
    sub = build_protocol(Table1Config(angles=[90], methods=methods[::-1], **common), data)
    _train_both_and_compare(full, sub)


def _train_both_and_compare(full, sub, epochs: int = 2) -> list[int]:
    """Train both protocols; every epoch's cosines and losses, and the parameters, of ``sub``'s runs equal
    those of the same runs in ``full`` bitwise. Returns where ``sub``'s runs are in ``full``."""
    labels = [s.label for s in full.specs]
    where = [full.runs.index((labels.index(sub.specs[m].label), a, s)) for m, a, s in sub.runs]
    for _ in range(epochs):
        cos_full, loss_full = full.train_epoch()
        cos_sub, loss_sub = sub.train_epoch()
        assert torch.equal(cos_full[where], cos_sub) and torch.equal(loss_full[where], loss_sub)
    for p_full, p_sub in zip(full.model.parameters(), sub.model.parameters()):
        assert torch.equal(p_full.detach()[where], p_sub.detach())
    return where


def _heldout_run(method, seed, data, angle_k, steps, batch, lr, hidden, depth):
    """One held-out run alone: nn.Linear modules, gate.backward(..., reference_loss=...) on the same batches."""
    net = _Run(seed, data.train_x[0].numel(), hidden, depth)
    opt = torch.optim.RMSprop(net.parameters(), lr=lr)
    gate = GradientGate(rule=base_method(method)[0])
    order = RunOrder([seed], len(data.train_y))
    ref_order = ReferenceOrder([seed], len(data.reference_y), batch)
    x_all, y_all = data.train_x, data.train_y
    done = 0
    while done < steps:
        idx = order.epoch()[0]
        for k in range(0, len(idx), batch):
            if done == steps:
                break
            bi, ri = idx[k : k + batch], ref_order.next()[0]
            x = x_all[bi]
            opt.zero_grad()
            loss_main = F.cross_entropy(net.heads[0](net.trunk(x.flatten(1))), y_all[bi])
            x_rot = torch.rot90(x, angle_k, dims=(-2, -1)).flatten(1)
            loss_aux = F.cross_entropy(net.heads[1](net.trunk(x_rot)), y_all[bi])
            ref = F.cross_entropy(net.heads[0](net.trunk(data.reference_x[ri].flatten(1))), data.reference_y[ri])
            gate.backward(loss_main, {"rotated": loss_aux}, net.trunk.parameters(), reference_loss=ref)
            opt.step()
            done += 1
    return net, gate


def test_stacked_heldout_runs_equal_separate_runs(digits):
    """Stacked held-out runs equal the same runs alone with gate.backward(..., reference_loss=...)."""
    held = load_table1_data("digits", reference_fraction=REFERENCE_FRACTION)
    data = type(held)(
        held.train_x[:200], held.train_y[:200], held.test_x, held.test_y, "digits", "subset", None,
        held.reference_x[:80], held.reference_y[:80],
    )  # fmt: skip
    hidden, depth, batch, lr, steps = 16, 2, 64, 3e-3, 5  # 3 steps per epoch; 1 reference batch per pass
    methods = ["unweighted_heldout", "weighted_heldout"]
    cfg = Table1Config(
        source="digits", angles=[0.0, 90.0], methods=methods, seeds=2, epochs=1, batch_size=batch, lr=lr,
        hidden=hidden, depth=depth,
    )  # fmt: skip
    proto = build_protocol(cfg, data)
    assert [g.reference for g in proto.trainer.groups] == [True, True]
    done = 0
    while done < steps:
        idx = proto.order.epoch()
        for k in range(0, idx.shape[1], batch):
            if done == steps:
                break
            x, y = task_batch(proto.views, proto.train_y, proto.task_view, idx[:, k : k + batch])
            proto.trainer.step(x, y, proto.reference_batch())
            done += 1
    for r, (mi, angle, seed) in enumerate(proto.runs):
        ref, gate = _heldout_run(methods[mi], seed, data, int(angle // 90), steps, batch, lr, hidden, depth)
        for got, want in zip(_stacked_params(proto.model, r), _reference_params(ref)):
            torch.testing.assert_close(got, want.detach(), rtol=1e-3, atol=0.05 * lr)
            assert (got - want.detach()).abs().mean() < 1e-6
        group = proto.trainer.groups[mi]
        row = r - group.runs.start
        assert int(group.gate.state.measured_steps) == int(gate.state.measured_steps) == steps
        assert float(group.gate.open_fraction()[row, 0]) == pytest.approx(float(gate.open_fraction().reshape(-1)[0]))
        mean, _, _ = group.gate.state.cosine_summary()  # the cosine against the reference, as alone
        want_mean, _, _ = gate.state.cosine_summary()
        assert float(mean[row, 0]) == pytest.approx(float(want_mean.reshape(-1)[0]), abs=1e-4)


def test_heldout_methods_cut_the_reference_split_for_every_method(monkeypatch):
    """The default command keeps its four methods and all the training data; a held-out method in a command
    cuts REFERENCE_FRACTION for every method of it; a held-out method without a reference split is refused."""
    import lightning_gradsim.data.table1 as t1

    assert DEFAULT_METHODS == ("main_only", "sum", "unweighted", "weighted")
    assert Table1Config().methods == DEFAULT_METHODS
    asked = []

    class Stop(Exception):
        pass

    def fake_load(source, root, split_seed, reference_fraction=0.0):
        asked.append(reference_fraction)
        raise Stop

    monkeypatch.setattr(t1, "load_table1_data", fake_load)
    for methods in (list(DEFAULT_METHODS), ["main_only", "weighted_heldout"]):
        with pytest.raises(Stop):
            run_table1(Table1Config(source="digits", methods=methods, progress=False))
    assert asked == [0.0, REFERENCE_FRACTION] and REFERENCE_FRACTION == 0.1
    monkeypatch.undo()
    small = load_table1_data("digits")
    with pytest.raises(ValueError, match="reference split"):
        build_protocol(Table1Config(source="digits", methods=["unweighted_heldout"], seeds=1, hidden=4), small)


def test_per_run_gate_statistics_equal_gate_backward():
    """One step: the stacked group's cosines and open flags are those of gate.backward on each run alone."""
    torch.manual_seed(0)
    seeds = [3, 4, 5]
    model = StackedMLP(seeds, input_dim=12, hidden=8, depth=2)
    trainer = StackedTrainer(model, [RunGroup("unweighted", make_gate("unweighted", threshold=0.1), slice(0, 3))])
    x = torch.randn(3, 2, 10, 12)
    y = torch.randint(0, 10, (3, 2, 10))
    rec = trainer.step(x, y)
    for r, seed in enumerate(seeds):
        net = _Run(seed, 12, 8, 2)
        gate = GradientGate(rule="unweighted", threshold=0.1)
        loss_main = F.cross_entropy(net.heads[0](net.trunk(x[r, 0])), y[r, 0])
        loss_aux = F.cross_entropy(net.heads[1](net.trunk(x[r, 1])), y[r, 1])
        stats = gate.backward(loss_main, {"rotated": loss_aux}, net.trunk.parameters())
        assert rec.cosine[r, 0].item() == pytest.approx(stats.cosine.item(), abs=1e-5)
        assert abs(stats.cosine.item() - 0.1) > 1e-3  # the decision is no rounding question (threshold 0.1)
        assert bool(rec.gate_open[r, 0]) == bool(stats.gate_open)


def test_main_only_does_not_depend_on_the_angle(digits):
    data = type(digits)(digits.train_x[:256], digits.train_y[:256], digits.test_x, digits.test_y, "digits", "subset")
    cfg = Table1Config(
        source="digits", angles=[0, 45, 90], methods=["main_only", "sum"], seeds=1, epochs=1, hidden=16, depth=2
    )
    proto = build_protocol(cfg, data)
    proto.train_epoch()
    w = proto.model.trunk[0]  # runs: main_only x (0, 45, 90), then sum x (0, 45, 90)
    assert torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])
    assert not torch.equal(w[3], w[4])


# ----------------------------------------------------------------------------- statistics and the table
def test_paired_t_test_by_hand_and_against_scipy():
    a, b = [0.10, 0.12, 0.11, 0.13, 0.09], [0.12, 0.12, 0.14, 0.15, 0.10]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 4)
    res = paired_t_test(a, b)
    assert res.t == pytest.approx(mean / (sd / math.sqrt(5)))
    assert student_t_sf(0.0, 3) == pytest.approx(0.5)
    assert student_t_sf(1.0, 1) == pytest.approx(0.25)  # Cauchy: P(T > 1) = 1/4
    stats = pytest.importorskip("scipy.stats")
    assert res.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    for t, df in [(0.3, 2), (2.5, 9), (-4.0, 9), (7.0, 30)]:
        assert student_t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-15)


def test_table_has_the_papers_layout():
    rows = [
        {
            "angle": a,
            "method": m,
            "seed": s,
            "test_error": 0.01 * (i + 1) + 0.001 * s + 0.01 * a / 45,
            "mean_cosine": 0.1,
            "open_fraction": 1.0,
        }
        for a in (0.0, 45.0)
        for i, m in enumerate(["weighted", "unweighted", "sum", "main_only"])
        for s in range(3)
    ]
    lines = error_table(rows, ["weighted", "unweighted", "sum", "main_only"], [0.0, 45.0]).splitlines()
    assert (
        lines[0]
        == "| rotation | single-task (`main_only`) | multi-task (`sum`) | our method (`unweighted`) | `weighted` |"
    )
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["0", "45"]
    # main_only at 0 degrees: errors 0.040, 0.041, 0.042 -> 4.10 ± 0.10 (%)
    assert lines[2].split("|")[2].strip() == "4.10 ± 0.10"


def test_methods_are_checked():
    assert parse_method("weighted:cosine_ema=0.9:per_layer=true").options == {"cosine_ema": 0.9, "per_layer": True}
    with pytest.raises(ValueError, match="key=value"):
        parse_method("unweighted:0.02")
    data = load_table1_data("digits")
    with pytest.raises(ValueError, match="Unknown method"):
        build_protocol(Table1Config(source="digits", methods=["nope"], seeds=1, epochs=1), data)
    with pytest.raises(ValueError, match="weights task losses"):
        build_protocol(Table1Config(source="digits", methods=["uncertainty"], seeds=1, epochs=1), data)
    proto = build_protocol(Table1Config(source="digits", methods=["dwa", "rlw"], seeds=1, epochs=1), data)
    dwa = proto.trainer.groups[0].gate.loss_weighting
    assert dwa.period == math.ceil(len(data.train_y) / 128)  # DWA averages its losses per epoch here


# ----------------------------------------------------------------------------- the command
def test_cli_end_to_end_on_digits(tmp_path, capsys):
    out = tmp_path / "t1"
    rc = main(
        [
            "--source",
            "digits",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--angles",
            "0,90",
            "--methods",
            "main_only,sum,unweighted,weighted",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 2
    assert {"angle", "method", "seed", "test_error", "mean_cosine", "open_fraction"} <= set(rows[0])
    for r in rows:
        assert 0.0 <= float(r["test_error"]) <= 1.0 and -1.0 <= float(r["mean_cosine"]) <= 1.0
        assert float(r["open_fraction"]) == {"main_only": 0.0, "sum": 1.0}.get(r["method"], float(r["open_fraction"]))
    table = (out / "table.md").read_text()
    assert (
        "| rotation | single-task (`main_only`) | multi-task (`sum`) | our method (`unweighted`) | `weighted` |"
        in table
    )
    assert "paired t-test" in table and "`unweighted` − `sum`" in table and "`unweighted` − `main_only`" in table
    for png in ("error_vs_angle.png", "cosine.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "single-task" in capsys.readouterr().out
    import json

    machine = json.loads((out / "result.json").read_text())["machine"]
    assert machine["torch"] == torch.__version__ and machine["threads"] == torch.get_num_threads()
    assert machine["cpu"] and machine["gpu"] is None  # a CPU run


@pytest.mark.slow
def test_cli_on_the_mnist_10k_file_says_it_splits(tmp_path, mnist_root):
    out = tmp_path / "m"
    rc = main(
        [
            "--root",
            mnist_root,
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--angles",
            "90",
            "--methods",
            "main_only,unweighted",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    table = (out / "table.md").read_text()
    assert "8,000/2,000" in table and "Not the paper's data" in table
    with open(out / "runs.csv") as f:
        errors = [float(r["test_error"]) for r in csv.DictReader(f)]
    assert all(e < 0.3 for e in errors)  # one epoch on 8,000 images already learns MNIST


def test_cli_reports_bad_input(capsys):
    assert main(["--source", "digits", "--methods", "main_only,bogus", "--no-progress"]) == 2
    assert "Unknown method 'bogus'" in capsys.readouterr().err


def test_paired_table_compares_a_heldout_gate_with_its_training_batch_gate():
    """The held-out column appears only with a held-out method; its difference is computed by hand."""
    from lightning_gradsim.experiments.table1_report import paired_table

    errors = {"main_only": [0.10, 0.12, 0.11], "sum": [0.12, 0.12, 0.14], "unweighted": [0.11, 0.13, 0.15]}
    errors["unweighted_heldout"] = [0.10, 0.12, 0.12]  # minus unweighted: -1, -1, -3 points, mean -1.67
    rows = [
        {"angle": 90.0, "method": m, "seed": s, "test_error": e} for m, es in errors.items() for s, e in enumerate(es)
    ]
    plain = paired_table(rows, ["main_only", "sum", "unweighted"], [90.0])
    held = paired_table(rows, list(errors), [90.0])
    assert plain is not None and held is not None and "heldout" not in plain
    header, _, row = held.splitlines()
    assert header.split(" | ")[-1] == "`unweighted_heldout` − `unweighted` |"
    assert row.split(" | ")[-1].startswith("-1.67 (p ")
