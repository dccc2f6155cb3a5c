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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .machine import machine_info

__all__ = [
    "MethodSpec",
    "parse_method",
    "Table1Config",
    "Table1Result",
    "StackedProtocol",
    "build_protocol",
    "run_table1",
    "setup_table1",
    "train_table1",
    "main",
    "DEFAULT_METHODS",
    "DEFAULT_ANGLES",
    "machine_info",
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
    """``"name[:key=value...]"`` -> :class:`MethodSpec` (values: numbers, true/false, or text).

    A torchjd weighting keeps its prefix: ``"torchjd:CAGrad:c=0.5"`` is the method ``torchjd:CAGrad``.

    >>> parse_method("torchjd:CAGrad:c=0.5").method
    'torchjd:CAGrad'
    """
    parts = [p.strip() for p in text.strip().split(":")]
    if parts[0] == "torchjd" and len(parts) > 1:
        parts = [f"torchjd:{parts[1]}"] + parts[2:]
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
    #: what the numbers were computed with (:func:`machine_info`): torch, CPU, GPU, threads
    machine: dict[str, Any] = field(default_factory=dict)

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
            "machine": self.machine,
        }


def _build_gates(specs: list[MethodSpec], common: dict[str, Any], steps_per_epoch: int = 1) -> list[Any]:
    """One gate per method. A loss weighting runs only if it can weight a batch of runs
    (``batched_weights``: DWA, RLW); DWA averages its losses per epoch (``period``), as its authors do."""
    import warnings

    from ..methods import is_method, list_methods, make_gate
    from .heldout import base_method

    gates = []
    for spec in specs:
        method = base_method(spec.method)[0]
        if not is_method(method):
            raise ValueError(
                f"Unknown method {spec.method!r}; choose from {', '.join(list_methods())}, or 'torchjd:<Name>'."
            )
        options = dict(spec.options)
        if method == "dwa":
            options.setdefault("period", steps_per_epoch)
        with warnings.catch_warnings():
            if not any(common.get(k) for k in ("threshold", "cosine_ema", "per_layer")):
                warnings.filterwarnings("ignore", message=".*ignores the cosine-gate option")
            gate = make_gate(method, **{**common, **options})
        if gate.loss_weighting is not None and not hasattr(gate.loss_weighting, "batched_weights"):
            raise ValueError(
                f"Method {spec.method!r} weights task losses in a way gradsim table1's stacked runs do not "
                "support (it needs batched_weights: dwa and rlw have it). Compare it with "
                "`gradsim compare --setup rotated_digits --methods ...` instead."
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
    gates = _build_gates(specs, cfg.gate_options(), math.ceil(len(data.train_y) / cfg.batch_size))
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


def run_table1(cfg: Table1Config, out_dir: str | None = None, resume: bool = False) -> Table1Result:
    """Train every ``method x angle x seed`` run of ``cfg`` as one stacked model; returns the result.

    With ``out_dir``, the state after each finished epoch is saved there, and ``resume=True``
    continues from it (see :mod:`~lightning_gradsim.experiments.table1_resume`).
    """
    start = time.perf_counter()
    data, proto = setup_table1(cfg)
    return train_table1(cfg, data, proto, start, out_dir, resume)


def setup_table1(cfg: Table1Config) -> tuple[Any, StackedProtocol]:
    """Load the data and stack the runs: every check of ``cfg`` and of the data happens here."""
    from ..data.table1 import load_table1_data
    from .heldout import reference_fraction_for

    _check(cfg)
    data = load_table1_data(cfg.source, cfg.root, cfg.split_seed, reference_fraction_for(cfg.methods))
    return data, build_protocol(cfg, data)


def train_table1(
    cfg: Table1Config,
    data: Any,
    proto: StackedProtocol,
    start: float,
    out_dir: str | None = None,
    resume: bool = False,
) -> Table1Result:
    """The epochs of :func:`run_table1` (saving each finished one in ``out_dir``), then the test errors."""
    from tqdm.auto import tqdm

    from .table1_resume import load_progress, restore_progress, save_progress

    num_runs = len(proto.runs)
    device = proto.views.device
    cos_epochs = torch.zeros(cfg.epochs, num_runs, device=device)
    loss_last = torch.zeros(num_runs, 2, device=device)
    first, earlier = 0, 0.0
    state = load_progress(out_dir, cfg) if out_dir is not None and resume else None
    if state is not None:
        restore_progress(proto, state)
        first, earlier = int(state["epoch"]), float(state["seconds"])
        cos_epochs[:first] = state["cos_epochs"].to(device)
        loss_last = state["loss_last"].to(device)
    bar = tqdm(
        range(first, cfg.epochs),
        desc=f"gradsim table1 ({num_runs} runs stacked)",
        unit="epoch",
        disable=not cfg.progress,
        initial=first,
        total=cfg.epochs,
    )
    for epoch in bar:
        cos_epochs[epoch], loss_last = proto.train_epoch()
        if out_dir is not None:
            seconds = earlier + time.perf_counter() - start
            save_progress(out_dir, cfg, proto, epoch + 1, cos_epochs, loss_last, seconds)
    bar.close()
    start -= earlier  # the time of the epochs run before a resume counts
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
        machine_info(device),
    )


def main(argv: list[str] | None = None) -> int:
    """``gradsim table1 ...`` (see :func:`lightning_gradsim.experiments.table1_cli.main`)."""
    from .table1_cli import main as table1_main

    return table1_main(argv)
