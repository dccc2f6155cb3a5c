"""Extra cost per training step of every method, as a ratio to a plain summed backward.

Same process, same model and data for every method: the paper's 3x100 ReLU MLP on 8x8 inputs
(batch 32 per task, two tasks), one step = forward both tasks + the method's backward +
``optimizer.step()``. The reference is ``(L_main + L_aux).backward()``. Each method is timed in
interleaved rounds and the median per-step time is reported; on a shared machine the numbers are
noisy (run it twice). Also times the cross-stitch MLP (two columns) with the ``sum`` rule.

Usage::

    python benchmarks/baselines_overhead.py [--steps 200] [--rounds 5] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradsim.baselines import CrossStitchMultiHeadNet, cross_stitch_mlp
from lightning_gradsim.methods import make_gate

METHODS = ["main_only", "sum", "unweighted", "weighted", "projection", "pcgrad", "uncertainty", "gradnorm"]


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 100, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({"main": nn.Linear(hidden, 10), "aux": nn.Linear(hidden, 10)})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.trunk(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())


def make_runner(method: str, device: torch.device, batch: int):
    torch.manual_seed(0)
    model: nn.Module = MLP()
    gate = None
    if method == "cross_stitch+sum":
        model = CrossStitchMultiHeadNet(cross_stitch_mlp(64, hidden=(100, 100, 100)), 100, {"main": 10, "aux": 10})
        gate = make_gate("sum")
    elif method != "plain":
        gate = make_gate(method)
    model.to(device)
    params = list(model.parameters()) + (list(gate.parameters()) if gate is not None else [])
    if gate is not None:
        gate.to(device)
    opt = torch.optim.RMSprop(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(2, batch, 64, generator=g).to(device)
    ys = torch.randint(0, 10, (2, batch), generator=g).to(device)
    shared = model.shared_parameters()
    shared_ids = {id(p) for p in shared}
    others = [p for p in params if id(p) not in shared_ids]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        main = F.cross_entropy(model(xs[0], "main"), ys[0])
        aux = F.cross_entropy(model(xs[1], "aux"), ys[1])
        if gate is None:
            (main + aux).backward()
        else:
            gate.backward(main, {"aux": aux}, shared, other_params=others)
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=METHODS + ["cross_stitch+sum"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ["plain"] + [m for m in args.methods if m != "plain"]
    runners = {m: make_runner(m, device, args.batch) for m in names}
    for run in runners.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {m: [] for m in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.rounds):
        for m, run in runners.items():  # interleaved, so background load hits every method alike
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run()
            sync()
            times[m].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["plain"])
    print(f"device={device} threads={args.threads} batch={args.batch}/task steps={args.steps} rounds={args.rounds}")
    print("| method | ms/step (median) | x plain summed backward |")
    print("|---|---|---|")
    for m in names:
        t = statistics.median(times[m])
        print(f"| {m} | {1e3 * t:.3f} | {t / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
