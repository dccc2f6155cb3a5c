"""``gradsim table1``: the paper's Table 1 (section 4.2), every run of it trained as one stacked model.

The main task classifies images, the auxiliary task classifies the *same* images rotated by an
angle; a 3x100 ReLU MLP trunk is shared, each task has a 10-way head; RMSprop, batch 128, 50
epochs, 10 seeds, angles 0/45/90/135/180, and the main task's test error is reported per angle
and method (single-task ``main_only``, multi-task ``sum``, the paper's ``unweighted`` gate, and
any other registered gradient rule). All ``methods x angles x seeds`` runs are one
:class:`~lightning_gradsim.experiments.stacked_mlp.StackedMLP`: each run has its own seeded
initialisation and data order (runs with the same seed share both, whatever their method or
angle, so methods are compared paired by seed), and one
:class:`~lightning_gradsim.GradientGate` per method gates its runs' two task gradients on the
trunk, run by run. Choices the paper leaves blank are listed in ``docs/protocols.md`` (section Table 1).

A method is a name from :func:`lightning_gradsim.methods.list_methods`, optionally with its own gate
options after colons: ``unweighted:threshold=0.02:cosine_ema=0.9:per_layer=true``; or a held-out gate
``unweighted_heldout`` / ``weighted_heldout`` (:mod:`~lightning_gradsim.experiments.heldout`: the cosine
against the main head's gradient on a held-out reference batch; with one in the command, every method
trains on the same 90% of the training images).

Example::

    gradsim table1 --source digits --out runs/table1                 # the README's main job
    gradsim table1 --root /data/mnist --epochs 50 --seeds 10          # the paper's protocol

>>> spec = parse_method("unweighted:threshold=0.02:per_layer=true")
>>> spec.method, spec.options
('unweighted', {'threshold': 0.02, 'per_layer': True})
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "MethodSpec",
    "parse_method",
    "Table1Config",
    "Table1Result",
    "StackedProtocol",
    "build_protocol",
    "run_table1",
    "main",
    "DEFAULT_METHODS",
    "DEFAULT_ANGLES",
]

DEFAULT_METHODS = ("main_only", "sum", "unweighted", "weighted")
DEFAULT_ANGLES = (0.0, 45.0, 90.0, 135.0, 180.0)
AUX_TASK = "rotated"


@dataclass(frozen=True)
class MethodSpec:
    """A method name and its own gate options (over the command's common ones)."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text.strip()


def parse_method(text: str) -> MethodSpec:
    """``"name[:key=value...]"`` -> :class:`MethodSpec` (values: numbers, true/false, or text)."""
    parts = [p.strip() for p in text.strip().split(":")]
    if not parts[0]:
        raise ValueError(f"Empty method name in {text!r}.")
    options = {}
    for part in parts[1:]:
        if "=" not in part:
            raise ValueError(
                f"Method option {part!r} in {text!r} must look like key=value (e.g. unweighted:threshold=0.02)."
            )
        key, value = part.split("=", 1)
        options[key.strip().replace("-", "_")] = _value(value)
    return MethodSpec(text.strip(), parts[0], options)


@dataclass
class Table1Config:
    """Everything one ``gradsim table1`` run needs (defaults: the paper's protocol)."""

    source: str = "mnist"
    root: str | None = None
    angles: Sequence[float] = DEFAULT_ANGLES
    methods: Sequence[str] = DEFAULT_METHODS
    seeds: int = 10
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 100
    depth: int = 3
    aux_weight: float = 1.0
    threshold: float = 0.0
    cosine_ema: float = 0.0
    per_layer: bool = False
    split_seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def gate_options(self) -> dict[str, Any]:
        return {
            "aux_weight": self.aux_weight,
            "threshold": self.threshold,
            "cosine_ema": self.cosine_ema,
            "per_layer": self.per_layer,
        }


@dataclass
class Table1Result:
    """Rows (one per run), per-epoch cosine curves, and what the data and the timing were."""

    config: Table1Config
    specs: list[MethodSpec]
    rows: list[dict[str, Any]]
    #: ``(method label, angle) -> [per seed: per-epoch mean cosine]``
    cosine_curves: dict[tuple[str, float], list[list[float]]]
    data_description: str
    data_note: str | None
    steps: int
    seconds: float
    device: str
    threads: int

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "methods": [asdict(s) for s in self.specs],
            "rows": self.rows,
            "cosine_curves": [{"method": m, "angle": a, "per_seed": c} for (m, a), c in self.cosine_curves.items()],
            "data": {"description": self.data_description, "note": self.data_note},
            "steps": self.steps,
            "seconds": self.seconds,
            "device": self.device,
            "threads": self.threads,
        }


def _build_gates(specs: list[MethodSpec], common: dict[str, Any]) -> list[Any]:
    from ..methods import list_methods, make_gate
    from .heldout import base_method

    known = list_methods()
    gates = []
    for spec in specs:
        method = base_method(spec.method)[0]
        if method not in known:
            raise ValueError(f"Unknown method {spec.method!r}; choose from {', '.join(known)} (or <rule>_heldout).")
        gate = make_gate(method, **{**common, **spec.options})
        if gate.loss_weighting is not None:
            raise ValueError(
                f"Method {spec.method!r} weights task losses and cannot gate given gradient vectors; "
                "gradsim table1 runs gradient rules (e.g. main_only, sum, unweighted, weighted, projection, pcgrad). "
                "Compare it with `gradsim compare --setup rotated_digits --methods ...` instead."
            )
        gates.append(gate)
    return gates


def _check(cfg: Table1Config) -> None:
    if cfg.seeds < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"seeds, epochs and batch_size must be >= 1, got {cfg.seeds}, {cfg.epochs}, {cfg.batch_size}.")
    if not cfg.angles or not cfg.methods:
        raise ValueError("Give at least one angle and one method.")
    if len({float(a) for a in cfg.angles}) != len(cfg.angles):
        raise ValueError(f"Duplicate angles in {list(cfg.angles)}.")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"Duplicate methods in {list(cfg.methods)}.")


@dataclass
class StackedProtocol:
    """Every run of a :class:`Table1Config` on its data, ready to train (see :func:`build_protocol`)."""

    specs: list[MethodSpec]
    #: ``(method index, angle, seed)`` per stacked run, method-major (each method's runs are contiguous).
    runs: list[tuple[int, float, int]]
    model: Any
    trainer: Any
    order: Any
    views: torch.Tensor  #: ``(V, N, D)`` training images, view 0 unrotated
    task_view: torch.Tensor  #: ``(R, 2)`` view read by each run's main and auxiliary task
    train_y: torch.Tensor
    batch_size: int
    #: the held-out reference images ``(N', D)`` and labels, and each run's batches of them (held-out methods)
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    reference_order: Any = None

    def reference_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every run's next reference batch ``(x (R, B', D), y (R, B'))``, or ``None`` without held-out runs."""
        if self.reference is None or self.reference_order is None:
            return None
        idx = self.reference_order.next()
        return self.reference[0][idx], self.reference[1][idx]

    def train_epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of every run; returns per run the mean cosine ``(R,)`` and mean losses ``(R, 2)``."""
        from ..data.table1 import task_batch

        idx = self.order.epoch()
        n, b = idx.shape[1], self.batch_size
        steps = math.ceil(n / b)
        cos = torch.zeros(len(self.runs), device=idx.device)
        loss = torch.zeros(len(self.runs), 2, device=idx.device)
        buffers: dict[int, torch.Tensor] = {}
        for k in range(steps):
            batch = idx[:, k * b : (k + 1) * b]
            size = batch.shape[1]
            if size not in buffers:
                buffers[size] = self.views.new_empty(len(self.runs), 2, size, self.views.shape[-1])
            x, y = task_batch(self.views, self.train_y, self.task_view, batch, out=buffers[size])
            record = self.trainer.step(x, y, self.reference_batch())  # x: (R, 2, B, D), task 1 rotated
            cos += record.cosine[:, 0]
            loss += record.loss
        return cos / steps, loss / steps


def build_protocol(cfg: Table1Config, data: Any) -> StackedProtocol:
    """Stack every ``method x angle x seed`` run of ``cfg`` on ``data``.

    ``data`` is a :class:`~lightning_gradsim.data.table1.Table1Data` (with its reference split when a
    method is held-out).
    """
    from ..data.table1 import rotated_views
    from .heldout import ReferenceOrder, base_method
    from .stacked_mlp import StackedMLP
    from .stacked_training import RunGroup, RunOrder, StackedTrainer

    _check(cfg)
    device = torch.device(cfg.device)
    specs = [parse_method(m) for m in cfg.methods]
    gates = _build_gates(specs, cfg.gate_options())
    angles = [float(a) for a in cfg.angles]
    view_angles = [0.0] + [a for a in angles if a % 360 != 0]
    views = rotated_views(data.train_x, view_angles).to(device)
    runs = [(si, a, s) for si in range(len(specs)) for a in angles for s in range(cfg.seeds)]
    per_method = len(angles) * cfg.seeds
    run_seeds = [s for _, _, s in runs]
    model = StackedMLP(run_seeds, data.input_dim, cfg.hidden, cfg.depth, num_tasks=2, device=device)
    groups = [
        RunGroup(spec.label, gate.to(device), slice(i * per_method, (i + 1) * per_method), base_method(spec.method)[1])
        for i, (spec, gate) in enumerate(zip(specs, gates))
    ]
    reference, reference_order = None, None
    if any(g.reference for g in groups):
        if data.reference_x is None or data.reference_y is None:
            raise ValueError(
                "A held-out method needs the data's reference split (load_table1_data(reference_fraction=...))."
            )
        n_ref = len(data.reference_y)
        reference = (data.reference_x.reshape(n_ref, -1).to(device), data.reference_y.to(device))
        reference_order = ReferenceOrder(run_seeds, n_ref, cfg.batch_size, device)
    trainer = StackedTrainer(model, groups, lr=cfg.lr, aux_names=[AUX_TASK])
    task_view = torch.tensor([[0, view_angles.index(a if a % 360 != 0 else 0.0)] for _, a, _ in runs], device=device)
    order = RunOrder(run_seeds, len(data.train_y), device)
    return StackedProtocol(
        specs,
        runs,
        model,
        trainer,
        order,
        views,
        task_view,
        data.train_y.to(device),
        cfg.batch_size,
        reference,
        reference_order,
    )


def run_table1(cfg: Table1Config) -> Table1Result:
    """Train every ``method x angle x seed`` run of ``cfg`` as one stacked model; returns the result."""
    from tqdm.auto import tqdm

    from ..data.table1 import load_table1_data
    from .heldout import reference_fraction_for

    _check(cfg)
    start = time.perf_counter()
    data = load_table1_data(cfg.source, cfg.root, cfg.split_seed, reference_fraction_for(cfg.methods))
    proto = build_protocol(cfg, data)
    num_runs = len(proto.runs)
    device = proto.views.device
    cos_epochs = torch.zeros(cfg.epochs, num_runs, device=device)
    loss_last = torch.zeros(num_runs, 2, device=device)
    bar = tqdm(
        range(cfg.epochs), desc=f"gradsim table1 ({num_runs} runs stacked)", unit="epoch", disable=not cfg.progress
    )
    for epoch in bar:
        cos_epochs[epoch], loss_last = proto.train_epoch()
    bar.close()
    test_x = data.test_x.reshape(len(data.test_y), -1).to(device)
    errors = proto.model.error(test_x, data.test_y.to(device)).cpu()
    finite = proto.model.finite().cpu()
    open_frac = torch.cat([g.gate.open_fraction().reshape(-1) for g in proto.trainer.groups]).cpu()
    summaries = [g.gate.state.cosine_summary() for g in proto.trainer.groups]
    cos_se = torch.cat([se.reshape(-1) for _, se, _ in summaries]).cpu()
    noise = torch.cat([nf.reshape(-1) for _, _, nf in summaries]).cpu()
    cos_cpu, loss_cpu = cos_epochs.cpu(), loss_last.cpu()
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, float], list[list[float]]] = {}
    for r, (si, angle, seed) in enumerate(proto.runs):
        label = proto.specs[si].label
        rows.append(
            {
                "angle": angle,
                "method": label,
                "seed": seed,
                "test_error": float(errors[r]),
                "mean_cosine": float(cos_cpu[:, r].mean()),
                "cosine_se": float(cos_se[r]),
                "open_fraction": float(open_frac[r]),
                "noise_fraction": float(noise[r]),
                "train_loss_main": float(loss_cpu[r, 0]),
                "train_loss_aux": float(loss_cpu[r, 1]),
                "finite": bool(finite[r]),
            }
        )
        curves.setdefault((label, angle), []).append([round(float(v), 5) for v in cos_cpu[:, r]])
    steps = math.ceil(len(data.train_y) / cfg.batch_size) * cfg.epochs
    return Table1Result(
        cfg,
        proto.specs,
        rows,
        curves,
        data.description,
        data.note,
        steps,
        time.perf_counter() - start,
        str(device),
        torch.get_num_threads(),
    )


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise SystemExit(f"gradsim table1: --angles takes comma-separated numbers, e.g. 0,90 ({err}).") from None


def main(argv: list[str] | None = None) -> int:
    """``gradsim table1 [--root DIR | --source digits] [--angles 0,90] [--methods a,b] [--seeds N] ...``"""
    import argparse

    wall_start = time.perf_counter()
    p = argparse.ArgumentParser(
        prog="gradsim table1",
        description="The paper's Table 1 (rotated MNIST, section 4.2): stacked runs, table, plots.",
    )
    p.add_argument("--root", help="torchvision MNIST folder (holding MNIST/raw); default $GRADSIM_MNIST_ROOT")
    p.add_argument(
        "--source", choices=["mnist", "digits"], default="mnist", help="mnist (needs --root) or digits (bundled 8x8)"
    )
    p.add_argument(
        "--angles", default=",".join(f"{a:g}" for a in DEFAULT_ANGLES), help="rotations in degrees, e.g. 0,90"
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help="methods, e.g. main_only,sum,unweighted:threshold=0.02"
    )
    p.add_argument("--seeds", type=int, default=10, help="number of seeds: 0..N-1 (default 10)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="RMSprop learning rate (blank in the paper; default 1e-3)")
    p.add_argument("--aux-weight", type=float, default=1.0, help="lambda of the auxiliary task (default 1)")
    p.add_argument("--threshold", type=float, default=0.0, help="cosine threshold of the gates (default 0)")
    p.add_argument("--cosine-ema", type=float, default=0.0, help="EMA factor of the cosine (default 0: none)")
    p.add_argument("--per-layer", action="store_true", help="cosine per parameter tensor, averaged (paper D.3)")
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument(
        "--split-seed", type=int, default=0, help="seed of the fixed train/test split (10k MNIST file, digits)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=os.path.join("runs", "table1"), help="output folder (default runs/table1)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or (os.environ.get("GRADSIM_MNIST_ROOT") if args.source == "mnist" else None)
    cfg = Table1Config(
        source=args.source,
        root=root,
        angles=_floats(args.angles),
        methods=[m for m in args.methods.split(",") if m.strip()],
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        depth=args.depth,
        aux_weight=args.aux_weight,
        threshold=args.threshold,
        cosine_ema=args.cosine_ema,
        per_layer=args.per_layer,
        split_seed=args.split_seed,
        device=args.device,
        progress=args.progress,
    )
    try:
        result = run_table1(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"gradsim table1: {err}", flush=True)
        return 2
    from .table1_report import write_outputs

    command = "gradsim table1 " + " ".join(argv if argv is not None else [])
    files = write_outputs(result, args.out, command=command.strip(), wall_start=wall_start)
    print(files.pop("markdown_text"))
    print("\nfiles:")
    for key, path in files.items():
        print(f"  {key:<14} {path}")
    return 0
