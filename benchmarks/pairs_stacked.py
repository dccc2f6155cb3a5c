"""Speed of ``gradsim pairs``' stacked trainer against the same runs trained one by one (not a test).

One process. ``R`` runs (pairs x seeds x methods, as in the default command: 2 x 3 x 3 = 18) of
the MNIST network (``small_cnn``, 28x28 inputs, a main and an auxiliary batch of ``--batch`` images
per run and step). Two ways to train them, round-robin step by step (so load changes on a shared
machine hit both alike):

* ``separate``: ``R`` ``nn.Module`` runs, each step ``GradientGate.backward`` + ``Adam.step`` per run
  (what ``gradsim compare`` would do without Lightning);
* ``stacked``: one :class:`~lightning_gradsim.experiments.stacked.StackedRuns` step for all runs.

Prints the median time of one step of all ``R`` runs, the ratio stacked / separate, and the
stacked cost per run-step as a multiple of one plain single-task step (forward and backward of
the main batch alone, ``loss.backward()``, ``Adam.step``): a gated step is two tasks' work.

Example::

    python benchmarks/pairs_stacked.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_gradsim.experiments.pairs import _net_factory
from lightning_gradsim.experiments.stacked import Run, StackedRuns
from lightning_gradsim.methods import make_gate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="small_cnn")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = ("main_only", "sum", "unweighted")
    runs = [Run(g, s, m) for m in methods for g in (0, 1) for s in (0, 1, 2)]
    make_net = _net_factory(args.model, 1)
    r = len(runs)
    stack = StackedRuns(make_net, runs)
    nets = [make_net(run.seed) for run in runs]
    gates = [make_gate(run.method) for run in runs]
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]
    plain = make_net(0)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(r, args.batch, 1, 28, 28, generator=g), torch.randint(2, (r, args.batch), generator=g)

    def separate(main, aux) -> None:
        for i, (net, gate, opt) in enumerate(zip(nets, gates, opts)):
            opt.zero_grad()
            lm = F.cross_entropy(net(main[0][i], "main"), main[1][i])
            la = F.cross_entropy(net(aux[0][i], "aux"), aux[1][i])
            gate.backward(lm, {"aux": la}, net.trunk.parameters())
            opt.step()

    def single(main, aux) -> None:
        plain_opt.zero_grad()
        F.cross_entropy(plain(main[0][0], "main"), main[1][0]).backward()
        plain_opt.step()

    timings: dict[str, list[float]] = {"separate": [], "stacked": [], "single": []}
    fns = {"separate": separate, "stacked": lambda m, a: stack.step(m, a), "single": single}
    for step in range(args.steps + 2):
        main, aux = batch(), batch()
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(main, aux)
            if step >= 2:  # warm-up
                timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(
        f"{r} runs of {args.model}, batch {args.batch} per task, {args.threads} thread(s), median of {args.steps} steps"
    )
    print(f"separate: {med['separate']:.3f} s per step of all runs")
    print(
        f"stacked : {med['stacked']:.3f} s per step of all runs  "
        f"(stacked / separate = {med['stacked'] / med['separate']:.2f})"
    )
    print(
        f"stacked cost per run-step = {med['stacked'] / r / med['single']:.2f} plain single-task steps "
        f"(separate: {med['separate'] / r / med['single']:.2f})"
    )


if __name__ == "__main__":
    main()
