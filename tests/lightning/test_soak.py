"""The soak as a test (issue 25): NaN/inf injected at known steps, one poisoned step is one skipped step.

The promise is GradScaler's: a skipped step leaves every piece of state alone. For every registered rule
x ``every_n_steps`` in {1, 5} x ``main_grad_ema`` in {0, 0.9} (rules that use a direction) x injection
site (a task's loss, its trunk gradient, its head's gradient; with ``every_n_steps = 5`` on measured steps
and on steps that reuse the weights), checked:

* the steps reported non-finite are exactly the injected ones; ``gate.state.skipped_steps`` (and the
  mixin's ``gradsim_last_step_skipped``) count exactly them;
* no step reported finite leaves a NaN/inf in ``.grad``; parameters, Adam's moments and the gate's state
  (cosine EMA and moments, direction EMA, reused weights) are finite at the end;
* the poisoned run *equals* a reference run that drops the poisoned batches. What "equal" must mean: a
  skipped call still counts towards ``every_n_steps`` (``gate.state.calls`` is the call index, and the
  measuring phase stays on it), and under 16-mixed the GradScaler backs off on the overflow, as in plain
  AMP training. So the reference drops the batch *and* moves the gate's call counter on (and backs the
  scaler off by its factor); then everything else (parameters, Adam's state, the gate's state, its
  generator) is bitwise equal in one process, and to 1e-5 under DDP (the ranks' mean against the
  concatenated batch; the two ranks bitwise equal to each other). The gate's ``step``/``skipped_steps``
  counters differ by the number injected, by design. Without moving the counter the runs differ once
  ``every_n_steps > 1`` (checked below: the comparison can fail).

The plain gate runs the whole matrix (``benchmarks/soak.py`` is the same code, long); the Lightning
mixin under 16-mixed (the real GradScaler path) and 2 DDP processes run a few combinations.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lightning_gradsim.rules import list_rules

from .._spawn import free_port
from ..scale_utils import DroppedCalls, TinyNet, ddp_worker, fit, make_batches, params
from .test_precision import scaler_plugin

_spec = importlib.util.spec_from_file_location("_soak_benchmark", Path(__file__).parents[2] / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules[_spec.name] = soak  # its dataclass looks its module up
_spec.loader.exec_module(soak)  # type: ignore[union-attr]

INF, NAN = math.inf, math.nan
#: every_n_steps = 1: each kind on each task, two steps in a row poisoned
PLAN_1 = {
    2: ("loss", "main", INF),
    3: ("trunk", "aux", NAN),
    4: ("head", "reg", -INF),
    9: ("head", "main", NAN),
    13: ("trunk", "main", INF),
    14: ("loss", "reg", NAN),
    17: ("head", "aux", INF),
}
#: every_n_steps = 5 (measured calls 0, 5, 10, ...): each kind on measured calls and on reused ones; a
#: poisoned measured call followed by a poisoned reused one (20, 21)
PLAN_5 = {
    5: ("loss", "aux", INF),
    7: ("loss", "main", NAN),
    10: ("trunk", "reg", NAN),
    11: ("trunk", "aux", INF),
    12: ("head", "reg", NAN),
    15: ("head", "main", INF),
    16: ("head", "aux", -INF),
    20: ("head", "aux", NAN),
    21: ("loss", "reg", INF),
    22: ("trunk", "main", NAN),
}
STEPS = {1: 20, 5: 30}


def _plan(every_n: int) -> dict[int, tuple[str, str, float]]:
    return PLAN_1 if every_n == 1 else PLAN_5


@pytest.mark.parametrize("rule, every_n, ema", soak.combos())
def test_one_injection_is_one_skipped_step_and_the_run_equals_the_one_without_the_batch(rule, every_n, ema):
    batches = soak.make_batches(STEPS[every_n])
    plan = _plan(every_n)
    run = soak.train(rule, every_n, ema, batches, plan)
    assert run.reported_bad == sorted(plan)
    assert run.skipped_steps == len(plan) and run.gate_step == len(batches)
    assert run.bad_grad_on_finite == []
    assert soak.nonfinite(run.state) == []
    if every_n > 1:  # the plan hits measured and reused calls alike (a measured call every 5)
        assert {s for s in plan if run.measured[s]} == {5, 10, 15, 20}
    ref = soak.train(rule, every_n, ema, batches, skip=set(plan))
    assert ref.reported_bad == [] and ref.skipped_steps == 0
    assert soak.differing(run.state, ref.state) == []  # bitwise, Adam and the gate's state included


def test_the_rules_of_the_matrix_are_every_registered_rule():
    assert {c[0] for c in soak.combos()} == set(list_rules())
    assert ("projection", 5, 0.9) in soak.combos() and ("weighted", 1, 0.9) not in soak.combos()


def test_the_comparison_can_fail_dropping_a_batch_without_counting_its_call_shifts_the_phase():
    """The reference must move the gate's call counter on: dropping the batches alone shifts which batches
    are measured once every_n_steps > 1, and the runs end apart."""
    batches = soak.make_batches(STEPS[5])
    run = soak.train("projection", 5, 0.9, batches, PLAN_5)
    naive = soak.train("projection", 5, 0.9, [b for i, b in enumerate(batches) if i not in PLAN_5])
    assert any(k.startswith("param/") for k in soak.differing(run.state, naive.state))


def test_the_soak_script_reports_each_combination_and_its_verdict(tmp_path, capsys):
    out = tmp_path / "soak.jsonl"
    assert soak.main(["--steps", "40", "--rules", "projection", "--every-n", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 of 2 combinations failed" in printed
    import json

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["main_grad_ema"], r["ok"]) for r in records] == [(0.0, True), (0.9, True)]
    assert all(r["injected"] == r["skipped_steps"] for r in records)


# ---------------------------------------------------------------------- the Lightning mixin, 16-mixed
def _adam(model) -> dict[str, torch.Tensor]:
    state = model.trainer.optimizers[0].state_dict()["state"]
    return {f"{i}/{k}": v.clone() for i, st in state.items() for k, v in st.items() if k != "step"}


def _gate(model) -> dict[str, torch.Tensor]:
    state = model.gradsim.state
    out = {k: v.clone() for k, v in state.state_dict().items() if isinstance(v, torch.Tensor)}
    if state.reuse is not None:
        out["reuse"] = state.reuse.weights.clone()
    return {k: v for k, v in out.items() if k not in ("step", "skipped_steps")}


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


#: 16-mixed needs the per-task gradients every step (the mixin refuses every_n_steps > 1 with a GradScaler):
#: every_n_steps = 5 runs in fp32 through the mixin
MIXIN_COMBOS = [
    ("projection", 1, 0.9, True),
    ("pcgrad", 1, 0.0, True),
    ("weighted", 1, 0.0, True),
    ("projection", 5, 0.9, False),
    ("unweighted", 5, 0.0, False),
]
#: batch -> site of the auxiliary task; with every_n_steps = 5, batch 5 is measured, 2, 3 and 8 reuse
MIXIN_PLAN = {2: "loss", 3: "trunk", 5: "head", 8: "trunk"}


@pytest.mark.parametrize("rule, every_n, ema, amp", MIXIN_COMBOS)
def test_the_mixin_skips_exactly_the_poisoned_steps_and_equals_the_run_without_them(rule, every_n, ema, amp):
    n = 11
    batches = make_batches(n, 8)
    gate = {"every_n_steps": every_n, "main_grad_ema": ema, "cosine_ema": 0.5}
    plugins = (lambda: [scaler_plugin(init_scale=2.0**10)]) if amp else list
    model = fit(TinyNet(rule, gate=gate, inject=MIXIN_PLAN), batches, plugins=plugins())
    assert model.skip_log == [i in MIXIN_PLAN for i in range(n)]
    assert int(model.gradsim.skipped_steps) == len(MIXIN_PLAN) and model.global_step == n - len(MIXIN_PLAN)
    if amp:  # backed off once per skipped step
        assert model.trainer.precision_plugin.scaler.get_scale() == 2.0 ** (10 - len(MIXIN_PLAN))
    assert _all_finite(params(model)) and _all_finite(_adam(model)) and _all_finite(_gate(model))
    ref = fit(
        TinyNet(rule, gate=gate),
        [b for i, b in enumerate(batches) if i not in MIXIN_PLAN],
        plugins=plugins(),
        callbacks=[DroppedCalls(MIXIN_PLAN, n, backoff=amp)],
    )
    assert ref.skip_log == [False] * (n - len(MIXIN_PLAN))
    for name, value in {**params(ref), **_adam(ref), **_gate(ref)}.items():
        mine = {**params(model), **_adam(model), **_gate(model)}[name]
        torch.testing.assert_close(mine, value, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------- 2 DDP processes
WORLD, DDP_BATCHES = 2, 12
DDP_SCENARIOS = [
    {  # every_n_steps > 1 under DDP needs the local sync (each rank decides, the updates are averaged)
        "name": "projection_n5_local",
        "model": {"rule": "projection", "sync": "local", "gate": {"every_n_steps": 5, "main_grad_ema": 0.9}},
        "inject": {5: "trunk", 7: "loss", 8: "head"},
        "inject_rank": 1,
    },
    {
        "name": "pcgrad",
        "model": {"rule": "pcgrad", "gate": {"cosine_ema": 0.5}},
        "inject": {3: "head", 4: "loss", 9: "trunk"},
        "inject_rank": 0,
    },
    {
        "name": "weighted_scaler",
        "model": {"rule": "weighted", "gate": {"cosine_ema": 0.5}},
        "inject": {6: "head", 10: "trunk"},
        "inject_rank": 1,
        "scaler": {"init_scale": 2.0**8},
    },
]
for _sc in list(DDP_SCENARIOS):  # each with its reference: the same DDP run without the poisoned batches
    _sc.update(num_batches=DDP_BATCHES, batch_size=8)
    DDP_SCENARIOS.append({**_sc, "name": _sc["name"] + "_ref", "drop": sorted(_sc["inject"])})
    _sc["model"] = {**_sc["model"], "inject": _sc["inject"]}


@pytest.fixture(scope="module")
def ddp_soak(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_soak")
    mp.spawn(ddp_worker, args=(WORLD, free_port(), str(out), DDP_SCENARIOS), nprocs=WORLD, join=True)
    return {
        sc["name"]: [
            torch.load(os.path.join(out, f"{sc['name']}_rank{r}.pt"), weights_only=False) for r in range(WORLD)
        ]
        for sc in DDP_SCENARIOS
    }


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [sc["name"] for sc in DDP_SCENARIOS if "drop" not in sc])
def test_ddp_a_nan_on_one_rank_is_one_skipped_step_on_both_and_equals_the_run_without_it(ddp_soak, name):
    sc = next(s for s in DDP_SCENARIOS if s["name"] == name)
    plan = sc["inject"]
    ranks = ddp_soak[name]
    for r in range(WORLD):
        assert ranks[r]["skip_log"] == [i in plan for i in range(DDP_BATCHES)], r
        assert int(ranks[r]["gate"]["state.skipped_steps"]) == len(plan)
        assert _all_finite(ranks[r]["params"]) and _all_finite(ranks[r]["gate"])
        assert _all_finite({f"{i}/{k}": v for i, st in ranks[r]["optimizer"].items() for k, v in st.items()})
    for key, value in ranks[0]["params"].items():  # the ranks stay bitwise equal
        torch.testing.assert_close(ranks[1]["params"][key], value, rtol=0, atol=0, msg=key)
    ref = ddp_soak[name + "_ref"]  # the same DDP run on the batches without the poisoned ones
    for r in range(WORLD):
        assert ref[r]["skip_log"] == [False] * (DDP_BATCHES - len(plan))
        for key, value in ref[r]["params"].items():
            torch.testing.assert_close(ranks[r]["params"][key], value, rtol=0, atol=0, msg=key)
    _assert_same_gate_state(ranks, ref)  # local too: every rank learns of the NaN before the gate commits (agree)


def _assert_same_gate_state(ranks, ref) -> None:
    for r in range(WORLD):
        for key, value in ref[r]["gate"].items():
            if not key.endswith(("skipped_steps", "state.step")):
                torch.testing.assert_close(ranks[r]["gate"][key], value, rtol=0, atol=0, msg=f"rank {r}: {key}")
