"""Bytes moved and step time of the gate's DDP sync modes against plain DDP (not a test).

Two (or ``--world``) CPU processes on gloo, one model per mode, all in the same processes: after a
warm-up, every mode runs one step in turn (round-robin, both ranks starting each step together), so
that load changes on a shared machine hit all modes alike. Prints per mode the median step time, the
elements handed to collectives per step and the bytes a ring algorithm moves per rank, each as a
ratio to plain DDP measured in the same run.

Modes:
  ddp              plain DDP, automatic optimisation: ``DistributedDataParallel(model)``, the summed
                   loss's backward (DDP's bucketed all-reduce overlaps it), ``optimizer.step()``
  global           the gate, ``gradsim_sync="global"`` (``AllReduce``: one all-reduce of the K
                   per-task gradients and the heads')
  global+overlap   the same, each task's all-reduce started while the next task's backward runs
                   (``AllReduce(overlap=True)``)
  sharded          ``gradsim_sync="sharded"`` (``ReduceScatter``: K reduce-scatters, the Gramian
                   all-reduced, one all-gather of the combined gradient)
  sharded+overlap  the same, each task's reduce-scatter started while the next task's backward runs
  local            ``gradsim_sync="local"`` (``AllReduceCombined``: gate locally, all-reduce the combined)

Bound of the exact modes with overlap: ``local`` (the gate's work and one all-reduce of the combined
gradient) plus the transfer that cannot overlap a backward pass, the last task's gradients: the median
time of an all-reduce of ``S`` elements alone, timed in the same rounds.

Bytes: every ``torch.distributed`` collective the gate calls is counted (elements x element size);
a ring moves ``2 (N-1)/N`` of an all-reduce's buffer per rank, ``(N-1)/N`` of a reduce-scatter's
input or an all-gather's output. Plain DDP's reducer all-reduces from C++, so its volume is the
size of its gradients (``S + H`` elements), all-reduced.

Examples::

    python benchmarks/sync_overhead.py                       # MLP trunk, ~2.4M shared parameters, K = 2
    python benchmarks/sync_overhead.py --aux 2 --steps 20    # K = 3
    python benchmarks/sync_overhead.py --quick               # a smoke run
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("ddp", "global", "global+overlap", "sharded", "sharded+overlap", "local")
COLLECTIVES = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single",
               "all_gather_into_tensor", "broadcast")  # fmt: skip


class Net(nn.Module):
    """An MLP trunk (``layers`` x ``hidden``) and one linear head per task."""

    def __init__(self, inputs: int, hidden: int, layers: int, num_tasks: int, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        dims = [inputs] + [hidden] * layers
        self.trunk = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def ring_bytes(name: str, numel: int, itemsize: int, world: int) -> float:
    """Bytes a ring algorithm sends per rank for one collective over ``numel`` elements."""
    share = (world - 1) / world
    factor = {"all_reduce": 2 * share, "broadcast": 1.0}.get(name, share)
    return factor * numel * itemsize


class Counter:
    """Wraps the torch.distributed collectives and counts what is handed to them."""

    def __init__(self, world: int) -> None:
        self.world, self.calls, self.elements, self.bytes = world, 0, 0, 0.0
        self.real = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name in self.real:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name: str) -> Any:
        real = self.real[name]

        def call(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if name.startswith("reduce_scatter"):  # (output, input): the input is what is reduced
                numel = args[0].numel() if args else kwargs["input"].numel()
            else:
                numel = tensor.numel()
            self.calls += 1
            self.elements += numel
            self.bytes += ring_bytes(name.split("_single")[0].split("_tensor")[0].replace("_into", ""), numel,
                                     tensor.element_size(), self.world)  # fmt: skip
            return real(tensor, *args, **kwargs)

        return call

    def reset(self) -> tuple[int, int, float]:
        out = (self.calls, self.elements, self.bytes)
        self.calls, self.elements, self.bytes = 0, 0, 0.0
        return out


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    from lightning_gradsim import GradientGate
    from lightning_gradsim.parallel.ddp_global import AllReduce
    from lightning_gradsim.parallel.ddp_local import AllReduceCombined
    from lightning_gradsim.parallel.ddp_sharded import ReduceScatter

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    num_tasks = 1 + args.aux
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.inputs, generator=g)
    ys = [torch.randint(0, 10, (args.batch,), generator=g) for _ in range(num_tasks)]
    runs: dict[str, Any] = {}
    for mode in args.modes:
        net = Net(args.inputs, args.hidden, args.layers, num_tasks)
        model = nn.parallel.DistributedDataParallel(net) if mode == "ddp" else net
        runs[mode] = (net, model, torch.optim.SGD(net.parameters(), lr=1e-3), GradientGate(rule="unweighted"))
    shared_numel = sum(p.numel() for p in runs[args.modes[0]][0].trunk.parameters())
    head_numel = sum(p.numel() for p in runs[args.modes[0]][0].heads.parameters())

    def transform(mode: str) -> Any:
        return {"global": AllReduce(), "global+overlap": AllReduce(overlap=True), "sharded": ReduceScatter(),
                "sharded+overlap": ReduceScatter(overlap=True), "local": AllReduceCombined()}[mode]  # fmt: skip

    def step(mode: str) -> None:
        net, model, opt, gate = runs[mode]
        opt.zero_grad()
        losses = [F.cross_entropy(o, y) for o, y in zip(model(x), ys)]
        if mode == "ddp":
            sum(losses).backward()
        else:
            gate.backward(
                losses[0], losses[1:], net.trunk.parameters(), net.heads.parameters(), transforms=[transform(mode)]
            )
        opt.step()

    counter = Counter(world)
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    times["transfer"] = []  # an all-reduce of S elements alone: the last task's gradients
    last_task = torch.zeros(shared_numel)
    counts: dict[str, tuple[int, int, float]] = {}
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(last_task)
        if i >= args.warmup:
            times["transfer"].append(time.perf_counter() - start)
        for mode in args.modes:
            dist.barrier()
            counter.reset()
            start = time.perf_counter()
            step(mode)
            elapsed = time.perf_counter() - start
            counts[mode] = counter.reset()
            if i >= args.warmup:
                times[mode].append(elapsed)
    if rank == 0:
        queue.put({"times": times, "counts": counts, "S": shared_numel, "H": head_numel, "K": num_tasks})
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--aux", type=int, default=1, help="auxiliary tasks (K = aux + 1)")
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--quick", action="store_true", help="a small model and a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.warmup = 256, 2, 4, 1
    if "ddp" not in args.modes:
        args.modes = ["ddp"] + list(args.modes)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    start = time.perf_counter()
    mp.spawn(worker, args=(args.world, port, args, queue), nprocs=args.world, join=True)
    wall = time.perf_counter() - start
    res = queue.get()
    S, H, K, N = res["S"], res["H"], res["K"], args.world
    ddp_elements, ddp_bytes = S + H, ring_bytes("all_reduce", S + H, 4, N)
    base = statistics.median(res["times"]["ddp"])
    print(f"sync overhead: {N} processes (gloo, CPU, {args.threads} thread each), MLP {args.inputs}-"
          f"{'-'.join([str(args.hidden)] * args.layers)}, K = {K} tasks, S = {S:,} shared and H = {H:,} head "
          f"elements, batch {args.batch} per process, {args.steps} timed steps per mode (round-robin)")  # fmt: skip
    transfer = 1e3 * statistics.median(res["times"]["transfer"])
    bound = 1e3 * statistics.median(res["times"]["local"]) + transfer if "local" in res["times"] else float("nan")
    header = ("mode", "step ms", "x ddp", "x bound", "collectives", "elements", "x ddp", "ring MB/rank", "x ddp")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for mode in args.modes:
        ms = 1e3 * statistics.median(res["times"][mode])
        if mode == "ddp":
            calls, elements, moved = "bucketed", ddp_elements, ddp_bytes
        else:
            calls, elements, moved = res["counts"][mode]
        print(f"| {mode} | {ms:.1f} | {ms / (1e3 * base):.2f} | {ms / bound:.2f} | {calls} | {elements:,} | "
              f"{elements / ddp_elements:.2f} | {moved / 1e6:.2f} | {moved / ddp_bytes:.2f} |")  # fmt: skip
    print(f"bound of the exact modes with overlap: local {bound - transfer:.1f} ms + all-reduce of the last task's "
          f"S elements alone {transfer:.1f} ms = {bound:.1f} ms")  # fmt: skip
    print(
        f"formulas (elements handed to collectives): ddp S+H; global K S+H+1; sharded K N c + (H+1) + L K^2 + N c "
        f"(c = ceil(S/N): K S reduce-scattered, S all-gathered); local S+H+1. Wall time {wall:.0f} s."
    )


if __name__ == "__main__":
    sys.exit(main())
