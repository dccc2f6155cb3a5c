"""Where the exact gate's step goes: a per-phase table of ``gate.backward`` (not a test).

One model, one batch (ResNet-18 at 64x64 by default, one auxiliary task, a shared batch). Times,
round-robin with the same steps (so that load changes on a shared machine hit all alike):

* ``plain sum``: ``sum(losses).backward()`` (the reference, 1.00x);
* ``two-backward loop``: ``a.backward(retain_graph=True); b.backward()``: the floor of any exact
  per-task method on a shared batch (one trunk backward per task, summed into ``.grad`` by autograd);
* ``gate``: ``GradientGate().backward(...)`` with timers around its phases.

The phases are timed by wrapping the functions the gate calls (this script patches them in its own
process only; a ``torch.profiler.record_function`` range of the same name is opened too, so a
``--trace`` shows them): the graph walk (``walk_graph``), the per-task backward passes
(``torch.autograd.grad``), the rest of the per-task bookkeeping (heads' sums), the Gramian
(``TaskGradients.gramian``), the decision (``decide``: cosines, rule, state and the step's one
finiteness check), the heads' norms for that check (``others_norms``), the combination written into
the shared ``.grad`` (``apply``), the heads' ``.grad`` writes (``write_others``), and the rest.
Prints the median ms of each phase and its share of the gate's step.

Examples::

    python benchmarks/step_phases.py --threads 2                 # ResNet-18, 64x64, batch 32, 1 aux
    python benchmarks/step_phases.py --threads 2 --steps 15 --separate
    python benchmarks/step_phases.py --models mlp --steps 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_overhead import Setup, gate_step, loop_step, plain_step, sync

import lightning_gradsim.core.gate as gate_mod
import lightning_gradsim.core.step as step_mod
from lightning_gradsim.core.task_gradients import TaskGradients

#: (label, owner, attribute): the functions whose time is a phase, in the order of a step.
PHASES: list[tuple[str, Any, str]] = [
    ("graph walk", gate_mod, "walk_graph"),
    ("per-task backward passes", None, "autograd.grad"),
    ("per-task bookkeeping (heads' sums)", gate_mod, "per_task_gradients"),
    ("Gramian", TaskGradients, "gramian"),
    ("decide (cosines, rule, state, finiteness check)", step_mod, "decide"),
    ("heads' norms (finiteness check)", TaskGradients, "others_norms"),
    ("combination into shared .grad (apply)", TaskGradients, "apply"),
    ("heads' .grad writes", TaskGradients, "write_others"),
]


class PhaseTimer:
    """Accumulates wall time per phase label (device-synchronised) for the current step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.profiler.record_function(label):
            yield
        sync(self.device)
        self.step[label] += time.perf_counter() - t0

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(label):
                return fn(*args, **kwargs)

        return wrapped

    def end_step(self, total: float) -> None:
        self.step["step"] = total
        self.steps.append(dict(self.step))
        self.step = defaultdict(float)


@contextmanager
def patched(timer: PhaseTimer, s: Setup) -> Iterator[None]:
    """Wrap the phase functions (and ``torch.autograd.grad``, the forward of ``s``) for one gate step."""
    saved: list[tuple[Any, str, Any]] = [(s, "forward", s.forward)]
    s.forward = timer.wrap("forward", s.forward)  # type: ignore[method-assign]
    for label, owner, attr in PHASES:
        if owner is None:
            continue
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, timer.wrap(label, getattr(owner, attr)))
    real_grad = torch.autograd.grad
    torch.autograd.grad = timer.wrap("per-task backward passes", real_grad)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.autograd.grad = real_grad  # type: ignore[assignment]
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)
        del s.forward  # the instance attribute: back to the method


def run(args: argparse.Namespace, device: torch.device) -> None:
    s = Setup(args.model, args.aux, args.separate, args.batch, args.image_size, device, torch.float32)
    configs: list[tuple[str, Callable[[], None]]] = [
        ("plain sum", plain_step(s)),
        ("two-backward loop", loop_step(s)),
        ("gate", gate_step(s, rule=args.rule)),
    ]
    timer = PhaseTimer(device)
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    for r in range(args.warmup + args.steps):
        for name, step in configs:
            s.zero_grad()
            sync(device)
            if name == "gate":
                with patched(timer, s):
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    total = time.perf_counter() - t0
                if r >= args.warmup:
                    timer.end_step(total)
                else:
                    timer.step = defaultdict(float)
            else:
                t0 = time.perf_counter()
                step()
                sync(device)
                total = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(total)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["plain sum"]
    section = "separate batches" if args.separate else "shared batch"
    print(f"\n### {args.model}, {args.aux} aux task(s), {section}, batch {args.batch}, median of {args.steps}")
    print("| configuration | step ms | x plain |")
    print("|---|---:|---:|")
    for name in med:
        print(f"| {name} | {med[name] * 1000:.1f} | {med[name] / base:.3f}x |")
    # Per-phase medians; "per-task bookkeeping" is per_task_gradients minus the autograd.grad inside it.
    steps = timer.steps
    per = {label: statistics.median(st.get(label, 0.0) for st in steps) for label, _, _ in PHASES}
    book = statistics.median(
        st.get("per-task bookkeeping (heads' sums)", 0.0) - st.get("per-task backward passes", 0.0) for st in steps
    )
    per["per-task bookkeeping (heads' sums)"] = book
    gate_total = statistics.median(st["step"] for st in steps)
    forward = statistics.median(st.get("forward", 0.0) for st in steps)
    inside = statistics.median(
        st["step"] - st.get("forward", 0.0) - st.get("per-task bookkeeping (heads' sums)", 0.0) - sum(
            st.get(label, 0.0) for label, _, _ in PHASES if label not in ("per-task backward passes",
                                                                          "per-task bookkeeping (heads' sums)")
        )
        for st in steps
    )  # fmt: skip
    print(f"\ngate step phases (median ms over {len(steps)} steps; % of the gate's step, {gate_total * 1000:.1f} ms)")
    print("| phase | ms | % of step |")
    print("|---|---:|---:|")
    print(f"| forward | {forward * 1000:.1f} | {100 * forward / gate_total:.1f}% |")
    rest = "rest of gate.backward (input checks, stats, Python)"
    print(f"| {rest} | {inside * 1000:.2f} | {100 * inside / gate_total:.2f}% |")
    for label, _, _ in PHASES:
        print(f"| {label} | {per[label] * 1000:.2f} | {100 * per[label] / gate_total:.2f}% |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="resnet18 (default) or mlp")
    parser.add_argument("--aux", type=int, default=1, help="auxiliary tasks (default 1)")
    parser.add_argument("--separate", action="store_true", help="one batch per task (default: one shared batch)")
    parser.add_argument("--rule", default="unweighted", help="gate rule (default unweighted)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# step_phases: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    run(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
