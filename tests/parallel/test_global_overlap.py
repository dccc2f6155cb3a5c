"""``AllReduce(overlap=True)`` (each task's all-reduce started during the next task's backward) gives the
same per-task gradients, heads, finiteness and ``.grad`` as the one bucketed all-reduce, in 2 real gloo
processes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from .._spawn import save_rank, spawn_ranks

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.timeout(300)]

WORLD = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.side = nn.Linear(5, 6)  # shared, but only the main task reads it: the aux row is None there
        self.main_head, self.aux_head = nn.Linear(6, 1), nn.Linear(6, 1)

    def losses(self, x: torch.Tensor, bad: bool) -> list[torch.Tensor]:
        h = self.trunk(x)
        main = (self.main_head(h + self.side(x)) ** 2).mean()
        aux = self.aux_head(h).mean() * (float("inf") if bad else 1.0)
        return [main, aux]

    def shared(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters()) + list(self.side.parameters())

    def heads(self) -> list[nn.Parameter]:
        return list(self.main_head.parameters()) + list(self.aux_head.parameters())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from lightning_gradsim import GradientGate
    from lightning_gradsim.core.transforms import READY, GradientTransform
    from lightning_gradsim.parallel.ddp_global import AllReduce

    class Record(GradientTransform):
        def __init__(self) -> None:
            self.seen: dict = {}

        def task_gradients(self, grads):  # what the rule sees, after the sync
            self.seen = {
                "rows": [[None if g is None else g.clone() for g in row] for row in grads.to_rows().rows],
                "others": [None if g is None else g.clone() for g in grads.others],
                "finite": grads.finite.clone(),
            }
            return READY

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    for overlap in (False, True):
        net, gate = Net(), GradientGate(rule="weighted", cosine_ema=0.5)
        steps = []
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(4, 5, generator=g)
            losses = net.losses(x, bad=(step == 2 and rank == 1))  # step 2: rank 1 alone sees an inf
            net.zero_grad(set_to_none=True)
            record = Record()
            transform = AllReduce(overlap=overlap)
            sent: list[int] = []
            real = transform.task_ready

            def task_ready(k, num_tasks, row, params, real=real, sent=sent):
                sent.append(k)
                real(k, num_tasks, row, params)

            transform.task_ready = task_ready  # type: ignore[method-assign]
            stats = gate.backward(losses[0], losses[1:], net.shared(), net.heads(), transforms=[transform, record])
            steps.append(
                {
                    **record.seen,
                    "grad": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
                    "weight": stats.weight.clone(),
                    "stats_finite": stats.finite.clone(),
                    "started": list(transform._pending) if overlap else [],
                    "sent": sent,
                }
            )
        results[overlap] = steps
    save_rank(out, rank, results)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("overlap"))


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())  # bitwise, NaN == NaN


def test_overlapped_all_reduce_equals_the_bucketed_one(results):
    for rank in results:
        for plain, overlapped in zip(rank[False], rank[True]):
            assert overlapped["sent"] == [0, 1]  # both tasks announced during the backward passes
            for key in ("rows", "grad"):
                flat_a = [t for row in plain[key] for t in (row if isinstance(row, list) else [row])]
                flat_b = [t for row in overlapped[key] for t in (row if isinstance(row, list) else [row])]
                assert len(flat_a) == len(flat_b)
                assert all(_equal(a, b) for a, b in zip(flat_a, flat_b)), key
            assert all(_equal(a, b) for a, b in zip(plain["others"], overlapped["others"]))
            for key in ("finite", "weight", "stats_finite"):
                assert torch.equal(plain[key], overlapped[key]), key


def test_every_rank_sees_the_same_averaged_gradients_and_the_remote_inf(results):
    r0, r1 = results
    for a, b in zip(r0[True], r1[True]):
        assert all(_equal(x, y) for ra, rb in zip(a["rows"], b["rows"]) for x, y in zip(ra, rb))
    assert [bool(s["finite"]) for s in r0[True]] == [True, True, False]  # rank 1's inf reaches rank 0
    assert [bool(s["stats_finite"]) for s in r1[True]] == [True, True, False]
    # The synchronised rows are not the local ones: the reference is discriminative.
    assert not torch.equal(r0[True][0]["rows"][0][0], r1[False][1]["rows"][0][0])
