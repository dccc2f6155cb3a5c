"""The sync-equivalence tester (the model: torchmetrics' ``MetricTester``, which runs every metric with DDP
on and off): every registered sync mode x every registered rule x every loss weighting the mode accepts,
a few gate steps on 2 real processes (gloo, plain torch: a trunk, a main head, two auxiliary heads, SGD),
checked against one process:

* an exact mode (``SyncMode.exact``: ``global``, ``sharded``, ``fsdp2``): each rank on its half of every
  batch ends as one process on the concatenated batch: parameters, the gate's state (cosine EMA, direction
  EMA gathered whole, counters, open counts, the loss weighting's state) and every step's statistics;
* ``local``: its documented definition, computed in one process from the two halves: each rank gates on
  its own half with its own state, and the applied update is the average of the per-rank combined gradients.

The combinations are read from the registries (``tests/parallel/_sync_tester.py``), so a new sync mode, rule
or loss weighting is tested as soon as it is registered. All of them run in ONE pair of spawned processes
(module fixture); the combinations a mode refuses are run last and must fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_gradsim.parallel.registry import SYNC_MODES
from lightning_gradsim.rules import list_rules

from .._spawn import spawn_ranks
from ._sync_tester import (
    AUX,
    RULE_VARIANTS,
    Combo,
    accepted_combos,
    all_combos,
    gradnorm_margins,
    reference,
    rule_of,
    worker,
)

WORLD = 2
# Tolerance: float32 (eps 1.2e-7). Two processes take the same per-task gradients as one, summed in another
# order: the mean of two 8-row means instead of one 16-row mean, and under "sharded"/"fsdp2" the Gramian as a
# sum of per-shard partial dot products (94 trunk elements). That is a relative error of at most ~n eps
# (~1e-5 for the Gramian's 94 terms, typically ~sqrt(n) eps ~1e-6), which 4 SGD steps (lr 0.05) on O(1)
# weights do not amplify. A wrong gate decision or a wrong weight moves parameters by about lr |g_aux|, some
# 1e-3 here (local's per-rank weights instead of the global ones: test_local_differs_from_the_concatenated_run).
RTOL, ATOL = 1e-4, 1e-5
# No decision may sit near a tie: every cosine a rule compares with its threshold (0) or whose sign it tests
# (PCGrad's conflicts, projection's aux . direction) is at least COSINE_MARGIN from it, and GradNorm's
# sign(G_i - target_i) at least GRADNORM_MARGIN (relative to the mean norm) from 0 - both far beyond the
# ~1e-5 rounding above. (Seen on this data: >= 0.058 and >= 1.5e-3.)
COSINE_MARGIN, GRADNORM_MARGIN = 0.02, 1e-4
ACCEPTED = accepted_combos()
# Refused by the registry although they run, and exactly (checked below). This tester found "sharded"
# refusing every loss weighting where only one that reads the task losses (GradNorm) fails; the registry now
# accepts UncertaintyWeighting there, and the set is empty. A new entry here is a registry to mend.
OVER_REFUSED: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    refused = [combo for combo, refusals in all_combos() if refusals]
    ranks = spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("sync_equivalence"), ACCEPTED + refused)
    return {key: [rank[key] for rank in ranks] for key in ranks[0]}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    else:  # counters, open counts, gate decisions: exactly
        assert torch.equal(got, want), f"{what}: {got} != {want}"


def _same_run(got: dict, want: dict, what: str) -> None:
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        _close(got["params"][name], value, f"{what}: parameter {name}")
    assert got["gate"].keys() == want["gate"].keys()
    for name, value in want["gate"].items():
        _close(got["gate"][name], value, f"{what}: gate state {name}")
    assert len(got["log"]) == len(want["log"])
    for step, (g, w) in enumerate(zip(got["log"], want["log"])):
        for field, value in w.items():
            _close(g[field], value, f"{what}: step {step} {field}")


def _assert_far_from_ties(want: list[dict], gradnorm: list[float]) -> None:
    for run in want:
        for gram, cosine, threshold in run["seen"]:
            norm = gram.diagonal(dim1=-2, dim2=-1).sqrt()  # (K,) or (L, K) for a per-tensor rule
            cos = gram / norm[..., :, None] / norm[..., None, :]
            off = ~torch.eye(gram.shape[-1], dtype=torch.bool).expand(gram.shape)
            # a per-tensor rule sees many more cosines (each tensor's): half the margin, still >1e4 x the rounding
            margin = COSINE_MARGIN if gram.dim() == 2 else COSINE_MARGIN / 2
            assert cos[off].abs().min() >= margin, cos
            assert (cosine - threshold).abs().min() >= COSINE_MARGIN, cosine
    assert all(m >= GRADNORM_MARGIN for m in gradnorm), gradnorm


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("combo", ACCEPTED, ids=str)
def test_two_processes_match_the_modes_definition(runs, combo):
    ranks = runs[combo.key]
    for rank in ranks:
        assert "error" not in rank, rank.get("error")
    for name, value in ranks[0]["params"].items():  # every mode keeps the replicas identical, bit for bit
        assert torch.equal(ranks[1]["params"][name], value), f"{combo}: the ranks' {name} drifted apart"
    with gradnorm_margins() as margins:
        want = reference(combo, WORLD)
    _assert_far_from_ties(want, margins)
    for r, (got, ref) in enumerate(zip(ranks, want)):
        _same_run(got, ref, f"{combo} rank {r}")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_refused_combinations_are_skipped_and_would_fail(runs):
    """The tester skips exactly what a mode refuses (``refusals != []``), every mode is exercised, and a refused
    combination, run anyway, fails with the error its first refusal's kind names (a refusal is not paperwork),
    but for the known over-refusals, which run and are exact."""
    combos = all_combos()
    assert {c for c, refusals in combos if not refusals} == set(ACCEPTED)
    assert {c.mode for c in ACCEPTED} == set(SYNC_MODES)
    errors = {"misconfigured": "ValueError", "unsupported": "NotImplementedError"}
    for combo, refusals in combos:
        ranks = runs[combo.key]
        if not refusals:
            assert all("error" not in rank for rank in ranks), ranks[0].get("error")
        elif (combo.mode, combo.weighting) in OVER_REFUSED:
            assert all("error" not in rank for rank in ranks), ranks[0].get("error")
            for r, (got, ref) in enumerate(zip(ranks, reference(combo, WORLD))):
                _same_run(got, ref, f"{combo} rank {r}")
        else:
            for rank in ranks:
                assert rank.get("error", "").startswith(errors[refusals[0][0]] + ":"), (combo, refusals, rank)
    refused = {(c.mode, c.weighting) for c, refusals in combos if refusals}
    assert OVER_REFUSED <= refused, "the registry accepts these now: remove them from OVER_REFUSED"
    # which loss weightings each known mode refuses: sharded only those reading the losses, fsdp2 every one
    known = {"global": set(), "local": set(), "sharded": {"gradnorm"}, "fsdp2": {"gradnorm", "uncertainty"}}
    for combo, refusals in combos:
        if combo.mode in known and combo.weighting in ("gradnorm", "uncertainty", None):
            assert bool(refusals) == (combo.weighting in known[combo.mode]), (combo, refusals)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_gate_opens_and_closes_on_two_processes(runs):
    """Not vacuous: under every mode the cosine rules both open and close the auxiliary tasks (on
    ``conflicts`` at the first steps, on ``agrees`` never for ``unweighted``)."""
    total_closed = 0
    for mode in SYNC_MODES:
        decisions = [
            torch.stack([step["gate_open"] for step in runs[c.key][0]["log"]])
            for c in ACCEPTED
            if c.mode == mode and rule_of(c.rule).needs_statistics
        ]
        opened = sum(int(d.sum()) for d in decisions)
        closed = sum(int((~d).sum()) for d in decisions)
        assert opened > 0 and closed > 0, (mode, opened, closed)
        total_closed += closed
        unweighted = torch.stack([step["gate_open"] for step in runs[f"{mode}-unweighted-none"][0]["log"]])
        assert unweighted[:, AUX.index("agrees")].all() and not unweighted[:2, AUX.index("conflicts")].any()
    assert total_closed > 0


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_differs_from_the_concatenated_run(runs):
    """``local`` is checked against its own definition, which is not the exact one: the ranks keep different
    gate states, and where the per-rank weights differ (PCGrad on each rank's Gramian, GradNorm's per-rank task
    weights) the update differs from one process on the concatenated batch by far more than the tolerance.
    (With weights that are the same on both halves - ``sum``, ``unweighted`` deciding alike - it is the same
    update: the average of the per-rank combined gradients is then the combined global one.)"""
    for combo in (Combo("local", "pcgrad", None), Combo("local", "sum", "gradnorm")):
        local = reference(combo, WORLD)[0]
        exact = reference(combo._replace(mode="global"), WORLD)[0]
        gap = max((local["params"][n] - p).abs().max().item() for n, p in exact["params"].items())
        assert gap > 50 * ATOL, (combo, gap)
    for key in (c.key for c in ACCEPTED if c.mode == "local" and rule_of(c.rule).needs_statistics):
        states = [rank["gate"]["state.cosine_state"] for rank in runs[key]]
        assert (states[0] - states[1]).abs().max() > 1e-3, key


def test_the_tester_follows_the_registry(monkeypatch):
    """A sync mode added to the registry is tested without touching the tester (no spawn here)."""
    before = all_combos()
    monkeypatch.setitem(SYNC_MODES, "global_copy", dataclasses.replace(SYNC_MODES["global"], name="global_copy"))
    after = all_combos()
    added = [(c._replace(mode="global"), r) for c, r in after if c.mode == "global_copy"]
    assert added == [(c, r) for c, r in before if c.mode == "global"]
    assert len(added) == (len(list_rules()) + len(RULE_VARIANTS)) * len({c.weighting for c, _ in before})
    assert {c for c, _ in after if c.mode == "global_copy"} <= set(accepted_combos())
    assert [(c, r) for c, r in after if c.mode != "global_copy"] == before
