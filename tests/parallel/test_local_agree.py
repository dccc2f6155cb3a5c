"""``gradsim_sync="local"`` (``AllReduceCombined``): a step skipped for another rank's NaN leaves this rank's gate
state as it was, on both of the gate's paths that decide (parameter and feature gradients), also when the NaN
is made by rank 1's backward through the trunk after the feature path decided. Two real gloo processes, plain
``gate.backward`` (the Lightning soak test covers the mixin)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .._poison import PoisonGrad
from .._spawn import save_rank, spawn_ranks
from ..scale_utils import join_as_torchrun

WORLD, STEPS, POISONED = 2, 4, 2  # rank 1's main loss (or its trunk's backward) is NaN at step 2
CASES = ("parameters", "features", "features_trunk")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from lightning_gradsim import GradientGate
    from lightning_gradsim.parallel.ddp_local import AllReduceCombined

    join_as_torchrun(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    states = {}
    for case in CASES:
        similarity, in_trunk = case.split("_")[0], case.endswith("trunk")
        torch.manual_seed(0)
        trunk, heads = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 1) for _ in range(2)])
        gate = GradientGate(rule="weighted", cosine_ema=0.5, similarity=similarity)
        g = torch.Generator().manual_seed(rank)
        after = []
        for step in range(STEPS):
            x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
            poisoned = rank == 1 and step == POISONED
            h = PoisonGrad.apply(trunk(x), poisoned and in_trunk)
            if similarity == "features":
                h = gate.mark_features(h)
            main = ((heads[0](h).squeeze(-1) - y[:, 0]) ** 2).mean()
            if poisoned and not in_trunk:
                main = main * float("nan")
            aux = ((heads[1](h).squeeze(-1) + y[:, 0] - y[:, 1]) ** 2).mean()
            trunk.zero_grad(set_to_none=True)
            heads.zero_grad(set_to_none=True)
            gate.backward(main, [aux], trunk.parameters(), heads.parameters(), transforms=[AllReduceCombined()])
            after.append({k: v.clone() for k, v in gate.state_dict().items() if isinstance(v, torch.Tensor)})
        states[case] = after
    save_rank(out, rank, states)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("local_agree"))


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
def test_a_step_skipped_for_another_ranks_nan_leaves_this_ranks_state(runs, case):
    for rank in range(WORLD):  # rank 0 saw a finite step, rank 1 the NaN
        before, after = runs[rank][case][POISONED - 1], runs[rank][case][POISONED]
        assert int(after["state.skipped_steps"]) == int(before["state.skipped_steps"]) + 1, rank
        for key, value in before.items():
            if not key.endswith(("skipped_steps", "state.step")):
                torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=f"rank {rank}: {key}")
        # not vacuous: the finite steps around it move the smoothed cosine
        moved = runs[rank][case][POISONED + 1]["state.cosine_state"]
        assert not torch.equal(moved, after["state.cosine_state"]), rank
