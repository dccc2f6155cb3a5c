"""Step-time and peak-memory overhead of the gradient-similarity gate (not a test).

One process, one model and one batch per configuration; after a warm-up, every configuration
runs one step in turn (round-robin, so that load changes on a shared machine hit all of them
alike) until each has ``--steps`` timed steps. Prints the median step time and the peak memory
of each configuration as ratios to the plain summed-loss step (``loss.sum().backward()``).

Sections:
  shared    all tasks read one batch through one trunk forward (the gate needs an extra
            backward per auxiliary task: exact modes, ``similarity="features"``,
            ``every_n_steps``);
  separate  every task has its own batch and trunk forward (ImageNet class pairs, different
            datasets): per-task gradients cost no extra backward.

Peers: ``naive loop`` = per-task ``backward(retain_graph=True)`` + flatten + combine + unflatten;
``two-backward loop (floor)`` = ``a.backward(retain_graph=True); b.backward()`` (one backward per
task summed into ``.grad``: what any exact per-task method costs at least on a shared batch);
``torchjd`` = ``torchjd.autojac.mtl_backward`` (shared) or ``torchjd.autojac.backward``
(separate) + ``jac_to_grad`` with the ``PCGrad`` aggregator (``pip install torchjd``; skipped
when it is not installed).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step; on CPU the resident-set
high-water mark of one step run in a forked child (approximate: memory the allocator reuses is
not counted). Both include the activations of the forward pass.

Examples::

    python benchmarks/step_overhead.py                 # full table (slow on a CPU)
    python benchmarks/step_overhead.py --quick         # a 2-minute smoke run
    python benchmarks/step_overhead.py --models resnet18 --aux 1 --sections shared
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gradsim import GradientGate

CORE_RULES = ("unweighted", "weighted", "projection", "sum", "main_only")


# ---------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """3 x 100 MLP trunk (784 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU()
        )
        self.num_features = 100

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def make_trunk(name: str) -> nn.Module:
    if name == "mlp":
        return MLP()
    if name == "resnet18":
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=0)
        return model
    raise ValueError(f"unknown model {name!r}; choose mlp or resnet18")


def input_shape(name: str, image_size: int) -> tuple[int, ...]:
    return (784,) if name == "mlp" else (3, image_size, image_size)


class Setup:
    """A trunk, one head per task, and the batches (one, or one per task)."""

    def __init__(
        self,
        model: str,
        num_aux: int,
        separate: bool,
        batch: int,
        image_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        torch.manual_seed(0)
        self.trunk = make_trunk(model).to(device)
        feats = self.trunk.num_features
        self.num_tasks = 1 + num_aux
        self.heads = nn.ModuleList([nn.Linear(feats, 10) for _ in range(self.num_tasks)]).to(device)
        self.separate = separate
        self.device, self.dtype = device, dtype
        n_batches = self.num_tasks if separate else 1
        shape = input_shape(model, image_size)
        self.xs = [torch.randn((batch,) + shape, device=device) for _ in range(n_batches)]
        self.ys = [torch.randint(0, 10, (batch,), device=device) for _ in range(self.num_tasks)]
        self.shared = list(self.trunk.parameters())
        self.others = list(self.heads.parameters())
        self.params = self.shared + self.others

    def autocast(self) -> Any:
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, gate: GradientGate | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Losses and the trunk features (one tensor, or one per task)."""
        with self.autocast():
            if self.separate:
                feats = [self.trunk(x) for x in self.xs]
            else:
                h = self.trunk(self.xs[0])
                if gate is not None and gate.similarity == "features":
                    gate.mark_features(h)
                feats = [h]
            losses = [
                F.cross_entropy(head(feats[k if self.separate else 0]).float(), y)
                for k, (head, y) in enumerate(zip(self.heads, self.ys))
            ]
        return losses, feats

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def shared_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.shared)


# ---------------------------------------------------------------------------------------- steps
def plain_step(s: Setup) -> Callable[[], None]:
    def step() -> None:
        losses, _ = s.forward()
        sum(losses).backward()

    return step


def loop_step(s: Setup) -> Callable[[], None]:
    """The floor of exact per-task gradients: one backward per task summed into ``.grad`` by autograd
    (``a.backward(retain_graph=True); b.backward()``; no per-task gradient is kept or combined)."""

    def step() -> None:
        losses, _ = s.forward()
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=k < len(losses) - 1)

    return step


def gate_step(s: Setup, grad_strategy: str | None = None, **gate_kwargs: Any) -> Callable[[], None]:
    gate = GradientGate(**gate_kwargs).to(s.device)
    if grad_strategy is not None:
        gate.grad_strategy = grad_strategy

    def step() -> None:
        losses, _ = s.forward(gate)
        gate.backward(losses[0], losses[1:], s.shared, s.others)

    return step


def naive_step(s: Setup) -> Callable[[], None]:
    """The usual loop: per-task backward(retain_graph=True), flatten, combine (unweighted), unflatten."""

    def step() -> None:
        losses, _ = s.forward()
        vecs = []
        head_grads: list[Tensor | None] = [None] * len(s.others)
        for k, loss in enumerate(losses):
            for p in s.params:
                p.grad = None
            loss.backward(retain_graph=k < len(losses) - 1)
            vecs.append(
                torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in s.shared])
            )
            for j, p in enumerate(s.others):
                if p.grad is not None:
                    head_grads[j] = p.grad.clone() if head_grads[j] is None else head_grads[j] + p.grad
        main = vecs[0]
        total = main.clone()
        for v in vecs[1:]:
            cos = torch.dot(main, v) / (main.norm() * v.norm() + 1e-12)
            total += (cos >= 0).to(v.dtype) * v
        offset = 0
        for p in s.shared:
            n = p.numel()
            p.grad = total[offset : offset + n].view_as(p).clone()
            offset += n
        for p, g in zip(s.others, head_grads):
            p.grad = g

    return step


def torchjd_step(s: Setup) -> Callable[[], None] | None:
    try:
        from torchjd.aggregation import PCGrad
        from torchjd.autojac import backward as jd_backward
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    aggregator = PCGrad()

    def step() -> None:
        losses, feats = s.forward()
        if s.separate:
            torch.autograd.backward(sum(losses), inputs=s.others, retain_graph=True)
            jd_backward(losses, inputs=s.shared)
        else:
            mtl_backward(losses, features=feats[0], shared_params=s.shared)
        jac_to_grad(s.shared, aggregator)

    return step


def configurations(s: Setup, rules: tuple[str, ...]) -> list[tuple[str, Callable[[], None]]]:
    configs: list[tuple[str, Callable[[], None]]] = [("plain sum", plain_step(s))]
    for rule in rules:
        configs.append((f"gate {rule}", gate_step(s, rule=rule)))
    if not s.separate:
        configs.append(("gate unweighted, sequential", gate_step(s, rule="unweighted", grad_strategy="sequential")))
        configs.append(("gate unweighted, features", gate_step(s, rule="unweighted", similarity="features")))
    configs.append(("gate unweighted, every 10", gate_step(s, rule="unweighted", every_n_steps=10)))
    jd = torchjd_step(s)
    if jd is not None:
        configs.append(("torchjd PCGrad", jd))
    configs.append(("naive loop", naive_step(s)))
    configs.append(("two-backward loop (floor)", loop_step(s)))
    return configs


# ---------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    s: Setup, configs: list[tuple[str, Callable[[], None]]], warmup: int, steps: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    for r in range(warmup + steps):
        for name, step in configs:
            s.zero_grad()
            sync(s.device)
            t0 = time.perf_counter()
            step()
            sync(s.device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory(s: Setup, step: Callable[[], None]) -> float:
    """Peak bytes of one step (after a warm-up step): CUDA allocator, or RSS of a forked child."""
    s.zero_grad()
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        s.zero_grad()
        return float(peak)
    if not hasattr(os, "fork"):
        return float("nan")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: one step, report the RSS high-water mark above the start
        try:
            os.close(r)
            torch.set_num_threads(1)
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _rss_kib("VmRSS")
            step()
            peak = _rss_kib("VmHWM")
            os.write(w, str((peak - base) * 1024).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(data.decode()) if data else float("nan")


def run_table(
    model: str, num_aux: int, separate: bool, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> None:
    s = Setup(model, num_aux, separate, args.batch, args.image_size, device, dtype)
    rules = tuple(args.rules.split(",")) if args.rules else CORE_RULES
    configs = configurations(s, rules)
    times = time_round_robin(s, configs, args.warmup, args.steps)
    mems = {name: peak_memory(s, step) for name, step in configs} if not args.no_memory else {}
    base_t = times["plain sum"]
    base_m = mems.get("plain sum", float("nan"))
    section = "separate batches" if separate else "shared batch"
    dt = str(dtype).replace("torch.", "")
    print(
        f"\n### {model}, {num_aux} aux task(s), {section} ({device.type}, {dt}, batch {args.batch}"
        + (f", {args.image_size}x{args.image_size}" if model != "mlp" else "")
        + ")"
    )
    print(
        f"shared parameters: {s.shared_bytes() / 2**20:.1f} MiB; memory budget of exact mode "
        f"(plain + {s.num_tasks} x shared + 10%): "
        + (
            f"{1.1 * (base_m + s.num_tasks * s.shared_bytes()) / base_m:.2f}x"
            if base_m == base_m and base_m > 0
            else "n/a"
        )
    )
    print("| configuration | step ms | time x plain | peak MiB | memory x plain |")
    print("|---|---:|---:|---:|---:|")
    for name, _ in configs:
        t = times[name]
        m = mems.get(name, float("nan"))
        mem_cols = f"{m / 2**20:.0f} | {m / base_m:.2f}x" if m == m and base_m == base_m and base_m > 0 else "n/a | n/a"
        print(f"| {name} | {t * 1000:.1f} | {t / base_t:.2f}x | {mem_cols} |")
    sys.stdout.flush()
    del s, configs
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints markdown tables (ratios to the plain summed-loss step).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: mlp + resnet18, 1 aux task, unweighted only, 3 steps"
    )
    parser.add_argument("--models", default="resnet18,mlp", help="comma list of resnet18, mlp (default: both)")
    parser.add_argument("--aux", default="1,3", help="comma list of auxiliary-task counts (default: 1,3)")
    parser.add_argument("--sections", default="shared,separate", help="comma list of shared, separate (default: both)")
    parser.add_argument(
        "--rules", default="", help=f"comma list of gate rules in exact mode (default: {','.join(CORE_RULES)})"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median; default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per configuration (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="batch size per task batch (default 32)")
    parser.add_argument("--image-size", type=int, default=64, help="ResNet input size (default 64)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 autocast on cuda, fp32 on cpu), fp32 or bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    args = parser.parse_args(argv)
    if args.quick:
        args.aux, args.rules, args.steps, args.warmup = "1", "unweighted", 3, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    print(
        f"# step_overhead: torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    for section in args.sections.split(","):
        for model in args.models.split(","):
            for num_aux in (int(a) for a in args.aux.split(",")):
                run_table(model, num_aux, section == "separate", args, device, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
