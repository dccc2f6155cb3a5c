"""The synthetic task-relatedness sweep: generator statistics, batched == plain training, outputs."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import replace

import pytest
import torch

from lightning_gradsim import GradientGate
from lightning_gradsim.experiments import relatedness as rel
from lightning_gradsim.experiments import relatedness_cli
from lightning_gradsim.experiments.relatedness import (
    METHODS,
    RunResult,
    SweepConfig,
    make_tasks,
    markdown_table,
    run_sweep,
    summarize,
    task_matrices,
    train_reference,
)

# Small shapes for the training tests (the statistics tests use the real 100 x 250 setup).
TINY = dict(input_dim=12, output_dim=6, width=10, depth=4, n_train=60, n_val=40, n_test=80, batch_size=20)


# ------------------------------------------------------------------------------ generator
def test_main_matrix_has_variance_10_and_is_shared_across_settings():
    b_same, a_same = task_matrices("same", seed=0)
    b_sim, a_sim = task_matrices("similar", seed=0)
    b_unr, a_unr = task_matrices("unrelated", seed=0)
    assert b_same.shape == (100, 250)
    # N(0, 10): 25000 entries, so the sample variance is 10 +- 0.09 (one s.d.).
    assert abs(b_same.mean().item()) < 0.1
    assert abs(b_same.var().item() - 10.0) < 0.5
    assert torch.equal(b_same, b_sim) and torch.equal(b_same, b_unr)
    assert not torch.equal(b_same, task_matrices("same", seed=1)[0])


def test_three_relatedness_settings():
    b, same = task_matrices("same", seed=4)
    assert torch.equal(same, b)
    b, similar = task_matrices("similar", seed=4)
    noise = similar - b
    assert abs(noise.var().item() - 3.5) < 0.2  # N(0, 3.5) noise on top of the main matrix
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), b.flatten()]))[0, 1].item()) < 0.03
    # Correlation of entries: 10 / sqrt(10 * 13.5) = 0.861.
    corr = torch.corrcoef(torch.stack([similar.flatten(), b.flatten()]))[0, 1].item()
    assert abs(corr - 10 / math.sqrt(10 * 13.5)) < 0.02
    b, unrelated = task_matrices("unrelated", seed=4)
    assert abs(unrelated.var().item() - 10.0) < 0.5
    assert abs(torch.corrcoef(torch.stack([unrelated.flatten(), b.flatten()]))[0, 1].item()) < 0.03


def test_task_data_shapes_targets_and_separate_inputs():
    data = make_tasks("similar", seed=2, aux_scale=3.0)
    x, y = data.main_train
    assert x.shape == (1000, 250) and y.shape == (1000, 100)
    assert data.main_val[0].shape == (1000, 250) and data.main_test[0].shape == (10000, 250)
    assert data.aux_train[0].shape == (1000, 250)
    assert abs(x.mean().item()) < 0.01 and abs(x.var().item() - 1.0) < 0.02
    torch.testing.assert_close(y, torch.tanh(x @ data.b_main.T))
    xa, ya = data.aux_train
    torch.testing.assert_close(ya, 3.0 * torch.tanh(xa @ data.b_aux.T))
    # The tasks do not share inputs, and train/val/test inputs are distinct draws.
    assert abs(torch.corrcoef(torch.stack([x.flatten(), xa.flatten()]))[0, 1].item()) < 0.01
    assert not torch.equal(x, data.main_val[0][:1000])


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="relatedness 'close'.*same, similar, unrelated"):
        task_matrices("close", seed=0)
    with pytest.raises(ValueError, match="Unknown method.*'nope'"):
        SweepConfig(methods=("nope",)).validate()
    with pytest.raises(ValueError, match="positive.*single"):
        SweepConfig(lambdas=(0.0,)).validate()
    assert relatedness_cli.main(["--lambdas", "a,b"]) == 2


def test_blog_alpha_maps_to_main_grad_ema():
    """Blog: M_t = alpha g_t + (1 - alpha) M_{t-1}; ours: main_grad_ema = 1 - alpha (M_0 = g_0)."""
    assert METHODS["projection_alpha0.1"].main_grad_ema == pytest.approx(0.9)
    assert METHODS["projection_alpha0.01"].main_grad_ema == pytest.approx(0.99)
    assert METHODS["projection"].main_grad_ema == 0.0
    alpha = 0.1
    gate = GradientGate(rule="projection", main_grad_ema=1 - alpha)
    gs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])]
    blog = gs[0]
    for t, g in enumerate(gs):
        if t > 0:
            blog = alpha * g + (1 - alpha) * blog
        gate.combine(g, {"aux": torch.tensor([0.5, 0.5])})
        torch.testing.assert_close(gate.main_grad_ema_0, blog)
    torch.testing.assert_close(blog, torch.tensor([0.71, 0.28]))  # by hand


# ------------------------------------------------------------------------------ training
def _weights_of_run(net, i):
    return [w[i].detach() for w in net.weights] + [b[i, 0].detach() for b in net.biases]


def _reference_weights(ref):
    return [lin.weight.detach().T for lin in ref.linears()] + [lin.bias.detach() for lin in ref.linears()]


def test_batched_sweep_equals_plain_gate_backward_per_run():
    """Each batched run == a plain nn.Module trained with GradientGate.backward(aux_weight=lambda)."""
    cfg = SweepConfig(seeds=(0, 1), lambdas=(0.5, 4.0), methods=tuple(METHODS), progress=False, **TINY)
    steps = 7  # crosses an epoch boundary (3 steps per epoch)
    _, net = run_sweep(cfg, max_steps=steps, return_net=True)
    runs = rel._plan(cfg)
    checked = set()
    for i, r in enumerate(runs):
        key = (r.method, r.relatedness)
        if key in checked:
            continue
        checked.add(key)
        ref = train_reference(r.relatedness, r.method, r.lam, r.seed, cfg, steps=steps)
        for got, want in zip(_weights_of_run(net, i), _reference_weights(ref)):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert len(checked) == len(METHODS) * 3 - 2  # single task is trained once per seed
    # The comparison can fail: a different lambda gives different weights.
    r = next(r for r in runs if r.method == "unweighted" and r.relatedness == "similar")
    i = runs.index(r)
    wrong = train_reference(r.relatedness, r.method, r.lam * 2, r.seed, cfg, steps=steps)
    diff = max((a - b).abs().max().item() for a, b in zip(_weights_of_run(net, i), _reference_weights(wrong)))
    assert diff > 1e-3


def test_dropping_stopped_runs_does_not_change_results(monkeypatch):
    cfg = SweepConfig(
        seeds=(0, 1),
        lambdas=(1.0,),
        methods=("single", "sum", "projection_alpha0.1", "unweighted"),
        max_epochs=12,
        patience=1,
        lr=3e-2,
        progress=False,
        **TINY,
    )
    calls = []
    original = rel._compact

    def counting(*args, **kwargs):
        calls.append(int(args[4].sum()))
        return original(*args, **kwargs)

    monkeypatch.setattr(rel, "_compact", counting)
    compact = run_sweep(cfg)
    assert calls, "no run was dropped from the batch: the test would not exercise compaction"
    full = run_sweep(replace(cfg, compact=False))
    assert len(calls) == len(set(calls))  # the reference run did not compact
    for a, b in zip(compact, full):
        assert (a.method, a.relatedness, a.seed, a.best_epoch) == (b.method, b.relatedness, b.seed, b.best_epoch)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-5)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)


# ------------------------------------------------------------------------------ outputs
def test_summary_mean_and_standard_error_by_hand():
    rows = [RunResult("same", "sum", 1.0, s, 3, 0.0, v) for s, v in enumerate([1.0, 2.0, 4.0])]
    rows.append(RunResult("same", "single", 0.0, 0, 3, 0.0, 5.0))
    summary = {(s["method"], s["lam"]): s for s in summarize(rows)}
    s = summary[("sum", 1.0)]
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    # sample variance = ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3; s.e. = sqrt(7/3 / 3)
    assert s["se"] == pytest.approx(math.sqrt(7 / 9))
    assert math.isnan(summary[("single", 0.0)]["se"])
    table = markdown_table(summarize(rows))
    assert "| sum | 1 | 2.3333 ± 0.8819 |" in table
    assert "| single task | - | 5.0000 ± nan |" in table


@pytest.mark.slow
def test_cli_two_seed_smoke_run_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "rel"
    code = relatedness_cli.main(
        [
            "--seeds",
            "2",
            "--lambdas",
            "0.5,2",
            "--max-epochs",
            "2",
            "--relatedness",
            "same,unrelated",
            "--methods",
            "single,sum,projection_alpha0.01,weighted",
            "--no-progress",
            "--out",
            str(out),
            "--n-train",
            "200",
            "--n-val",
            "100",
            "--n-test",
            "300",
            "--batch-size",
            "50",
        ]
    )
    assert code == 0
    assert sorted(os.listdir(out)) == ["claim3.md", "relatedness.png", "runs.csv", "summary.csv", "table.md"]
    assert "Verdict (plain)" in (out / "claim3.md").read_text()
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 * 2 * (1 + 3 * 2)  # seeds x relatedness x (single + 3 methods x 2 lambdas)
    assert {int(r["seed"]) for r in runs} == {0, 1}
    assert all(0 < float(r["test_loss"]) < 2.0 and 1 <= int(r["best_epoch"]) <= 2 for r in runs)
    table = (out / "table.md").read_text()
    assert "| method | lambda | same | unrelated |" in table
    assert "over 2 seed(s)" in table
    lines = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert len(lines) == 1 + 3 * 2
    assert (out / "relatedness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv") as f:
        assert all(int(r["n"]) == 2 for r in csv.DictReader(f))


# ------------------------------------------------------------------------------ the blog's third claim
def test_claim3_is_the_default_comparison_with_the_blogs_ema():
    """Blog, Figure 13: 'the case alpha = 0.01'; M(0) = g(0), M(t) = alpha g(t) + (1 - alpha) M(t - 1)."""
    assert rel.BLOG_ALPHA == 0.01
    assert SweepConfig().methods == rel.CLAIM3_METHODS
    assert {"single", "sum", "projection_alpha0.01", "unweighted", "weighted"} <= set(rel.CLAIM3_METHODS)
    for key in ("projection_alpha0.01", "unweighted_alpha0.01", "weighted_alpha0.01"):
        assert METHODS[key].main_grad_ema == pytest.approx(1 - 0.01)
    assert METHODS["unweighted"].main_grad_ema == 0.0 and METHODS["weighted"].main_grad_ema == 0.0
    # the cosine rules' gate follows the blog's recursion, and gates on cos(M(t), g_aux)
    gate = METHODS["unweighted_alpha0.01"].gate(1.0)
    gs = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.2]), torch.tensor([-1.0, 0.2])]
    aux = torch.tensor([0.3, 1.0])
    m = gs[0]
    for t, g in enumerate(gs):
        if t > 0:
            m = 0.01 * g + 0.99 * m
        out, _ = gate.combine(g, {"aux": aux})
        torch.testing.assert_close(gate.main_grad_ema_0, m)
        # cos(M, aux) > 0 throughout although cos(g, aux) < 0 at t >= 1: the auxiliary is added
        torch.testing.assert_close(out, g + aux)
    plain, _ = METHODS["unweighted"].gate(1.0).combine(gs[1], {"aux": aux})
    torch.testing.assert_close(plain, gs[1])  # plain unweighted drops it: cos(g, aux) < 0


def test_direction_rules_equal_the_plain_rules_without_ema():
    from lightning_gradsim.experiments.ema_cosine import DirectionUnweighted, DirectionWeighted

    gen = torch.Generator().manual_seed(0)
    main, aux = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen)
    for direction_rule, name in ((DirectionUnweighted(), "unweighted"), (DirectionWeighted(), "weighted")):
        got, _ = GradientGate(rule=direction_rule, aux_weight=0.7).combine(main, {"aux": aux}, batch_dims=1)
        want, _ = GradientGate(rule=name, aux_weight=0.7).combine(main, {"aux": aux}, batch_dims=1)
        torch.testing.assert_close(got, want)
    # weighted by hand: g + lambda max(0, cos) aux with cos = 0.6 for main (1, 0), aux (3, 4)
    gate = GradientGate(rule=DirectionWeighted(), aux_weight=2.0)
    out, _ = gate.combine(torch.tensor([1.0, 0.0]), {"aux": torch.tensor([3.0, 4.0])})
    torch.testing.assert_close(out, torch.tensor([1.0 + 2 * 0.6 * 3, 2 * 0.6 * 4]))


def _rows(values):
    """values: {(relatedness, method): [test loss per seed]} -> RunResult rows at lambda 1."""
    return [RunResult(r, m, 1.0, s, 1, 0.0, v) for (r, m), vs in values.items() for s, v in enumerate(vs)]


def test_claim3_verdict_by_hand():
    from lightning_gradsim.experiments.relatedness_claims import claim3_cells, claim3_holds, claim3_markdown

    base = {"sum": [0.90, 0.91, 0.92], "projection_alpha0.01": [0.89, 0.905, 0.915]}
    better = [0.80, 0.82, 0.81]  # lower than both, paired t far below -2
    same = [0.90, 0.91, 0.92]
    values = {}
    for rel_ in ("same", "similar", "unrelated"):
        for m, v in base.items():
            values[(rel_, m)] = v
        for m in ("unweighted_alpha0.01", "weighted_alpha0.01"):
            values[(rel_, m)] = better if rel_ == "unrelated" else same
    cells = claim3_cells(_rows(values), "alpha0.01")
    assert len(cells) == 6 and [c.better for c in cells if c.relatedness == "unrelated"] == [True, True]
    c = next(c for c in cells if c.relatedness == "unrelated" and c.rule == "unweighted_alpha0.01")
    assert c.diff_sum == pytest.approx((0.80 - 0.90 + 0.82 - 0.91 + 0.81 - 0.92) / 3)
    assert claim3_holds(cells) == (True, "every condition met")
    values[("similar", "weighted_alpha0.01")] = better  # now also better for similar tasks: "only" fails
    held, reason = claim3_holds(claim3_cells(_rows(values), "alpha0.01"))
    assert held is False and "weighted_alpha0.01 is also better than both for similar" in reason
    assert "NOT HELD" in claim3_markdown(_rows(values))
    partial = {k: v for k, v in values.items() if k[0] != "same"}
    assert claim3_holds(claim3_cells(_rows(partial), "alpha0.01"))[0] is None
