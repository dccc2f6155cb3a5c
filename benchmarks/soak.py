"""Soak test of the gate's skipped steps: NaN/inf injected at known steps, one poisoned step = one skipped step.

For every registered rule x ``every_n_steps`` in {1, 5} x ``main_grad_ema`` in {0, 0.9} (rules that use a
direction only; else 0), a small trunk with a main head and two auxiliary heads trains with Adam through
``GradientGate.backward`` (the optimizer steps only when ``stats.finite``). NaN or inf is injected at
chosen steps into a task's *loss* (times inf/NaN), its *trunk* gradient (a hook on the trunk output that
task reads) or its *head*'s weight gradient (a hook on the weight it multiplies by); with
``every_n_steps > 1`` injections land on measured steps and on steps that *reuse* the last weights.

Checked for each combination (the promise is GradScaler's: a skipped step leaves every piece of state alone):
  * the steps the gate reports non-finite (``stats.finite``) are exactly the injected ones, and
    ``gate.state.skipped_steps`` is their number;
  * no step reported finite leaves a NaN/inf in any ``.grad``;
  * the parameters, Adam's ``exp_avg``/``exp_avg_sq``, and the gate's state (cosine EMA, direction EMA,
    cosine moments, reused weights) are finite at the end;
  * (``--reference``) the run equals, bitwise, a reference run that skips the poisoned batches and only moves
    the gate's call counter on (``gate.state.calls``: a skipped call still counts towards ``every_n_steps``,
    so with ``every_n_steps > 1`` the measuring phase stays on the call index, not the batch index).

Prints one line per combination, writes each as a JSON line to ``--out`` as it finishes, and exits
non-zero if any check fails::

    python benchmarks/soak.py                       # 200 steps per combination (a minute on a laptop)
    python benchmarks/soak.py --steps 10000 --out soak.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gradsim import GradientGate
from lightning_gradsim.rules import get_rule, list_rules

IN, HIDDEN, CLASSES = 8, 16, 3
KINDS = ("loss", "trunk", "head")
TASKS = ("main", "aux", "reg")  # the main task, a classification and a regression auxiliary task
EMAS = (0.0, 0.9)


def combos(rules: list[str] | None = None, every_ns: tuple[int, ...] = (1, 5)) -> list[tuple[str, int, float]]:
    """``(rule, every_n_steps, main_grad_ema)``: every registered rule, the EMA only where it uses a direction."""
    out = []
    for rule in rules or list_rules():
        emas = EMAS if get_rule(rule).uses_main_direction else (0.0,)
        out += [(rule, n, ema) for n in every_ns for ema in emas]
    return out


def make_batches(steps: int, batch: int = 16, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(x, y_main, y_aux, y_reg)``; the auxiliary labels agree with the main ones on some batches and
    not on others, so the cosines change sign along the run."""
    g = torch.Generator().manual_seed(seed)
    w_main, w_other, w_reg = (torch.randn(IN, CLASSES, generator=g) for _ in range(3))
    out = []
    for b in range(steps):
        x = torch.randn(batch, IN, generator=g)
        mix = 0.9 if b % 3 == 0 else 0.1
        y_aux = (x @ (mix * w_main + (1 - mix) * w_other)).argmax(1)
        out.append((x, (x @ w_main).argmax(1), y_aux, (x @ w_reg)[:, :1].tanh()))
    return out


class SoakNet(nn.Module):
    """A two-layer trunk, a main head and two auxiliary heads on the same batch; ``forward(batch, inject)``
    returns ``{task: loss}`` with ``inject = (kind, task, value)`` poisoning that task (or ``None``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())
        self.heads = nn.ModuleDict(
            {"main": nn.Linear(HIDDEN, CLASSES), "aux": nn.Linear(HIDDEN, CLASSES), "reg": nn.Linear(HIDDEN, 1)}
        )

    def forward(self, batch: tuple[Tensor, ...], inject: tuple[str, str, float] | None = None) -> dict[str, Tensor]:
        x, y, y_aux, y_reg = batch
        h = self.trunk(x)
        outs = {}
        for task, head in self.heads.items():
            feats, weight = h, head.weight
            if inject is not None and inject[1] == task:
                bad = inject[2]
                if inject[0] == "trunk":  # this task's gradient on the trunk output
                    feats = h * 1.0
                    feats.register_hook(lambda g, bad=bad: torch.full_like(g, bad))
                elif inject[0] == "head":  # this head's weight gradient only (the trunk's stays finite)
                    weight = head.weight * 1.0
                    weight.register_hook(lambda g, bad=bad: torch.full_like(g, bad))
            outs[task] = F.linear(feats, weight, head.bias)
        losses = {
            "main": F.cross_entropy(outs["main"], y),
            "aux": F.cross_entropy(outs["aux"], y_aux),
            "reg": F.mse_loss(outs["reg"], y_reg),
        }
        if inject is not None and inject[0] == "loss":
            losses[inject[1]] = losses[inject[1]] * inject[2]
        return losses


def plan(steps: int, every_n: int, rate: float = 0.03, seed: int = 0) -> dict[int, tuple[str, str, float]]:
    """A random injection plan: each step poisoned with probability ``rate``, kind, task and value (inf,
    -inf or NaN) drawn at random; with ``every_n > 1`` about half the injections fall on reused steps."""
    g = torch.Generator().manual_seed(seed)
    values = (math.inf, -math.inf, math.nan)
    out = {}
    for step in range(steps):
        if float(torch.rand((), generator=g)) < rate:
            kind, task, value = (int(torch.randint(n, (), generator=g)) for n in (3, 3, 3))
            out[step] = (KINDS[kind], TASKS[task], values[value])
    return out


@dataclass
class Run:
    """What a run did, step by step, and its end state."""

    reported_bad: list[int] = field(default_factory=list)  #: steps the gate reported non-finite
    measured: list[bool] = field(default_factory=list)  #: per call: whether it measured
    bad_grad_on_finite: list[int] = field(default_factory=list)  #: steps reported finite with a NaN in .grad
    skipped_steps: int = 0
    gate_step: int = 0
    state: dict[str, Tensor] = field(default_factory=dict)  #: parameters, optimizer and gate state


def train(
    rule: str,
    every_n: int,
    ema: float,
    batches: list[tuple[Tensor, ...]],
    injections: dict[int, tuple[str, str, float]] | None = None,
    skip: set[int] | frozenset[int] = frozenset(),
    seed: int = 0,
) -> Run:
    """Train ``SoakNet`` on ``batches`` with Adam through the gate, poisoning the steps of ``injections``;
    the steps in ``skip`` are not run at all (their batch is dropped) but the gate's call counter moves on."""
    injections = injections or {}
    model = SoakNet(seed)
    gate = GradientGate(rule=rule, every_n_steps=every_n, main_grad_ema=ema, cosine_ema=0.5, aux_weight=0.5, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    shared = list(model.trunk.parameters())
    run = Run()
    for step, batch in enumerate(batches):
        if step in skip:
            gate.state.calls += 1  # the skipped call of the poisoned run: counted, nothing else
            continue
        opt.zero_grad(set_to_none=True)
        run.measured.append(gate.state.will_measure(every_n))
        losses = model(batch, injections.get(step))
        main = losses.pop("main")
        stats = gate.backward(main, losses, shared)
        assert stats is not None
        if bool(stats.finite.all()):
            if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                run.bad_grad_on_finite.append(step)
            opt.step()
        else:
            run.reported_bad.append(step)
    run.skipped_steps, run.gate_step = int(gate.state.skipped_steps), int(gate.state.step)
    run.state = end_state(model, opt, gate)
    return run


def end_state(model: nn.Module, opt: torch.optim.Optimizer, gate: GradientGate) -> dict[str, Tensor]:
    """Every piece of state a step may touch, by name (the gate's step/skip counters left out: they count
    the skipped calls by design)."""
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, st in enumerate(opt.state.values()):
        out.update({f"adam/{i}/{k}": v.clone() for k, v in st.items() if isinstance(v, Tensor)})
    for k, v in gate.state.state_dict().items():
        if isinstance(v, Tensor) and not k.endswith(("skipped_steps", "step")):
            out[f"gate/{k}"] = v.clone()
    if gate.state.reuse is not None:
        out["gate/reuse/weights"] = gate.state.reuse.weights.clone()
    if gate.state._generator is not None:  # random rules (pcgrad): the generator's state
        out["gate/generator"] = gate.state._generator.get_state()
    return out


def nonfinite(state: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point entries of ``state`` holding a NaN/inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def differing(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """The names whose tensors are not bitwise equal (NaN equal to NaN), or present in one only."""
    keys = set(a) | set(b)
    return sorted(k for k in keys if k not in a or k not in b or not torch.equal(a[k].nan_to_num(), b[k].nan_to_num()))


def soak(
    rule: str,
    every_n: int,
    ema: float,
    batches: list[tuple[Tensor, ...]],
    injections: dict[int, tuple[str, str, float]],
    reference: bool = True,
) -> dict[str, Any]:
    """One combination: the poisoned run, its checks and (``reference``) the reference run; a JSON-able
    record with ``ok`` the verdict."""
    start = time.perf_counter()
    run = train(rule, every_n, ema, batches, injections)
    on_reused = sum(1 for s in injections if not run.measured[s])
    rec: dict[str, Any] = {
        "rule": rule,
        "every_n_steps": every_n,
        "main_grad_ema": ema,
        "steps": len(batches),
        "injected": len(injections),
        "injected_on_reused": on_reused,
        "reported_nonfinite": len(run.reported_bad),
        "skipped_steps": run.skipped_steps,
        "wrong_steps": sorted(set(run.reported_bad) ^ set(injections)),
        "nan_grad_on_finite_step": run.bad_grad_on_finite,
        "nonfinite_state": nonfinite(run.state),
    }
    if reference:
        ref = train(rule, every_n, ema, batches, skip=set(injections))
        rec["differs_from_reference"] = differing(run.state, ref.state)
    rec["ok"] = (
        rec["skipped_steps"] == rec["injected"] == rec["reported_nonfinite"]
        and not rec["wrong_steps"]
        and not rec["nan_grad_on_finite_step"]
        and not rec["nonfinite_state"]
        and not rec.get("differs_from_reference")
    )
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per combination (default 200)")
    parser.add_argument("--rate", type=float, default=0.03, help="fraction of steps poisoned (default 0.03)")
    parser.add_argument("--rules", nargs="*", help="rules to run (default: every registered rule)")
    parser.add_argument("--every-n", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--no-reference", action="store_true", help="skip the bitwise comparison (half the time)")
    parser.add_argument("--out", help="append one JSON line per finished combination to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batches = make_batches(args.steps, seed=args.seed)
    failed = 0
    print(f"{'rule':<11}{'n':>3}{'ema':>5}{'injected':>10}{'on reused':>10}{'skipped':>9}  verdict", flush=True)
    for rule, every_n, ema in combos(args.rules, tuple(args.every_n)):
        injections = plan(args.steps, every_n, args.rate, seed=args.seed + 1)
        rec = soak(rule, every_n, ema, batches, injections, reference=not args.no_reference)
        failed += not rec["ok"]
        problems = [
            f"{k}={rec[k]}"
            for k in ("wrong_steps", "nan_grad_on_finite_step", "nonfinite_state", "differs_from_reference")
            if rec.get(k)
        ]
        verdict = "ok" if rec["ok"] else "FAIL " + " ".join(problems)[:300]
        print(
            f"{rule:<11}{every_n:>3}{ema:>5}{rec['injected']:>10}{rec['injected_on_reused']:>10}"
            f"{rec['skipped_steps']:>9}  {verdict} ({rec['seconds']} s)",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"{failed} of {len(combos(args.rules, tuple(args.every_n)))} combinations failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
