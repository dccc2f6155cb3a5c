"""GPU readiness in one run (not a test): what a lent GPU should be asked, in under 8 minutes.

Prints, in order:

1. the step-overhead table in bf16 autocast (fp32 on CPU): plain summed loss, the gate
   (``unweighted``), the usual two-backward loop, and torchjd's PCGrad when it is importable; 1 and 3
   auxiliary tasks; one shared batch and separate batches per task; median step time and peak memory
   of each, as ratios to the plain step (the pieces of ``benchmarks/step_overhead.py``);
2. a class-pair ``fit`` (``ClassPairDataModule`` + ``MultiTaskClassifier``) on a generated 64x64 image
   folder, images/s against the same network trained as a plain LightningModule (summed losses,
   automatic optimisation, no mixin);
3. an FSDP2 run (``ModelParallelStrategy``, ``fully_shard``) with the gate when more than one GPU
   is visible (a separate process, whose ranks Lightning starts by re-running it).

Examples::

    python benchmarks/gpu_check.py                   # on a GPU: resnet18, batch 32, 200 fit steps
    python benchmarks/gpu_check.py --device cpu      # small sizes; what CI runs (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import (  # benchmarks/ is a folder of scripts, not a package
    Setup,
    gate_step,
    naive_step,
    peak_memory,
    plain_step,
    time_round_robin,
    torchjd_step,
)

#: sizes per device: model, batch, image side, timed and warm-up steps, fit steps, images per class
SIZES: dict[str, dict[str, Any]] = {
    "cuda": dict(model="resnet18", batch=32, image=64, steps=20, warmup=3, fit_steps=200, per_class=96),
    "cpu": dict(model="mlp", batch=8, image=16, steps=2, warmup=1, fit_steps=6, per_class=12),
}


# ------------------------------------------------------------------------------- 1. step overhead
def overhead_tables(device: torch.device, dtype: torch.dtype, size: dict[str, Any]) -> None:
    for separate in (False, True):
        for num_aux in (1, 3):
            s = Setup(size["model"], num_aux, separate, size["batch"], size["image"], device, dtype)
            configs = [("plain sum", plain_step(s)), ("gate unweighted", gate_step(s, rule="unweighted"))]
            configs.append(("two-backward loop", naive_step(s)))
            jd = torchjd_step(s)
            configs.append(("torchjd PCGrad", jd) if jd is not None else ("torchjd PCGrad (not installed)", None))  # type: ignore[arg-type]
            timed = [(n, f) for n, f in configs if f is not None]
            times = time_round_robin(s, timed, size["warmup"], size["steps"])
            mems = {n: peak_memory(s, f) for n, f in timed}
            section = "separate batches" if separate else "shared batch"
            print(
                f"\n### {size['model']}, {num_aux} aux, {section} "
                f"({device.type}, {str(dtype)[6:]}, batch {size['batch']})"
            )
            print("| configuration | step ms | x plain | peak MiB | x plain |")
            print("|---|---:|---:|---:|---:|")
            t0, m0 = times["plain sum"], mems["plain sum"]
            for name, f in configs:
                if f is None:
                    print(f"| {name} | - | - | - | - |")
                    continue
                m = mems[name]
                mem = f"{m / 2**20:.1f} | {m / m0:.2f}x" if m == m and m0 > 0 else "n/a | n/a"
                print(f"| {name} | {times[name] * 1e3:.2f} | {times[name] / t0:.2f}x | {mem} |")
            sys.stdout.flush()


# ------------------------------------------------------------------------------- 2. class-pair fit
def make_folder(root: str, per_class: int, side: int = 64) -> str:
    """ImageFolder layout with the default pair (trimaran, catamaran) and two other classes, 64x64 JPEGs."""
    from PIL import Image

    from lightning_gradsim.data.imagenet import PAIR_PRESETS

    classes = [*PAIR_PRESETS["trimaran_catamaran"][:2], "n01440764", "n01443537"]
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for k, wnid in enumerate(classes):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            for i in range(n):
                pixels = (torch.rand(side, side, 3, generator=g) * 60 + 40 * k).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(os.path.join(root, split, wnid, f"{i}.JPEG"), quality=90)
    return root


def _plain_module(backbone: str) -> Any:
    """The network of MultiTaskClassifier, trained the usual way: summed losses, automatic optimisation."""
    import lightning as L
    import torch.nn.functional as F

    from lightning_gradsim.models import MultiHeadNet, build_trunk

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MultiHeadNet(*build_trunk(backbone, in_chans=3), {"main": 2, "aux": 2})

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return sum(F.cross_entropy(self.net(x, name), y) for name, (x, y) in batch.items())  # type: ignore[return-value]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Plain()


def _images_per_second(module: Any, root: str, size: dict[str, Any], device: torch.device) -> float:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_gradsim.data import ClassPairDataModule

    class Clock(Callback):
        def __init__(self, skip: int) -> None:
            self.skip, self.start, self.images = skip, 0.0, 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == self.skip:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()
            if trainer.global_step >= self.skip:
                self.images += sum(len(y) for _, y in batch.values())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    dm = ClassPairDataModule(root, pair="trimaran_catamaran", image_size=64, batch_size=size["batch"], val_fraction=0)
    clock = Clock(skip=min(10, size["fit_steps"] // 3))
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=size["fit_steps"], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock], limit_val_batches=0,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return clock.images / clock.seconds


def fit_check(device: torch.device, size: dict[str, Any]) -> None:
    from lightning_gradsim.experiments import MultiTaskClassifier

    backbone = "resnetv2_18" if device.type == "cuda" else "tiny_cnn"
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(tmp, size["per_class"])
        gated = MultiTaskClassifier(tasks={"main": 2, "aux": 2}, backbone=backbone, input_dim=None, optimizer="adam")
        rates = {
            "plain LightningModule (summed losses)": _images_per_second(_plain_module(backbone), root, size, device),
            "MultiTaskClassifier (GradSimMixin, unweighted)": _images_per_second(gated, root, size, device),
        }
    base = next(iter(rates.values()))
    print(f"\n### class-pair fit: {backbone}, 64x64, batch {size['batch']} per task, {size['fit_steps']} steps")
    print("| module | images/s | x plain |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")


# ------------------------------------------------------------------------------- 3. FSDP2
def fsdp_run(steps: int = 20) -> None:
    """One FSDP2 run on every visible GPU (Lightning starts the ranks by re-running this command)."""
    import lightning as L
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_gradsim import GradientGate, GradSimMixin

    class Sharded(GradSimMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
            self.heads = nn.ModuleList([nn.Linear(256, 10), nn.Linear(256, 10)])
            self.gradsim = GradientGate(rule="unweighted")

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for m in [*self.trunk, *self.heads]:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def shared_parameters(self) -> Any:
            return self.trunk.parameters()

        def task_losses(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            x, y = batch
            h = self.trunk(x)
            return {"main": F.cross_entropy(self.heads[0](h), y), "aux": F.cross_entropy(self.heads[1](h), y % 3)}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(steps)]
    n = torch.cuda.device_count()
    model = Sharded()
    trainer = L.Trainer(
        accelerator="gpu", devices=n, strategy=ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1),
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=data)
    finite = all(bool(torch.isfinite(p.full_tensor()).all()) for p in model.parameters())
    if trainer.is_global_zero:
        print(
            f"FSDP2 on {n} GPUs: {steps} steps in {time.perf_counter() - start:.1f} s; parameters finite: {finite}; "
            f"gate steps {int(model.gradsim.step)}, skipped {int(model.gradsim.skipped_steps)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--fit-steps", type=int, help="steps of the class-pair fit (default: 200 on a GPU, 6 on CPU)")
    parser.add_argument("--fsdp-only", action="store_true", help=argparse.SUPPRESS)  # section 3's own process
    args = parser.parse_args(argv)
    if args.fsdp_only:
        fsdp_run()
        return 0
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    size = dict(SIZES["cuda" if device.type == "cuda" else "cpu"])
    if args.fit_steps:
        size["fit_steps"] = args.fit_steps
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"# gpu_check: torch {torch.__version__}, {device} ({name})")
    start = time.perf_counter()
    overhead_tables(device, dtype, size)
    fit_check(device, size)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus > 1:
        print(f"\n### FSDP2 ({gpus} GPUs)")
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--fsdp-only"], check=True)
    else:
        print(f"\n### FSDP2: skipped ({gpus} GPU(s) visible; it needs 2 or more)")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
