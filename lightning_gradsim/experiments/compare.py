"""``gradsim compare``: every method on one setup over several seeds, as a table and plots.

The Python API, stable for plug-ins:

* **Setups** -- :func:`register_setup` ``(name)`` registers a factory
  ``factory(method: str, seed: int, gate: dict, **options) -> (LightningModule, LightningDataModule)``.
  The module must build its gate with ``lightning_gradsim.methods.make_gate(method, **gate)``, use
  :class:`~lightning_gradsim.GradSimMixin`, and log the main task's accuracy as ``val/acc`` in
  validation and ``test/acc`` in test (``test/error = 1 - test/acc`` is what the table reports).
  Built in: ``rotated_digits``, ``class_pair``, ``celeba`` and two cross-stitch setups, named in
  :data:`lightning_gradsim.experiments.registry.SETUPS` and imported only when built (add a
  ``"module:factory"`` line there for yours, or ``gradsim compare --import my.module``).
* **Methods** -- any name from :func:`lightning_gradsim.methods.list_methods` (rules and factories
  registered with :func:`lightning_gradsim.methods.register_method`).
* :func:`compare` runs ``methods x seeds x variants`` (``variants={"angle": [0, 90]}`` sweeps one
  setup option; the rows of the paper's Table 1) and returns a :class:`CompareResult`; it writes
  ``runs.csv`` (one row per run), ``summary.csv``, ``table.md``, ``accuracy.png`` (main-task
  validation accuracy over steps, mean over seeds: the paper's Figure 3 b/c), ``cosine.png`` (the
  cosine between the main and auxiliary gradients over steps: Figure 3 a) and ``result.json``.
  The command line is :mod:`lightning_gradsim.experiments.compare_cli`.

Example (trains 12 short runs)::

    from lightning_gradsim.experiments.compare import compare, register_setup
    result = compare("rotated_digits", methods=["main_only", "sum", "unweighted"], seeds=[0, 1],
                     variants={"angle": [0, 180]}, max_steps=200, out_dir="runs/quick")
    print(result.markdown())

    @register_setup("my_setup")
    def my_setup(method, seed, gate, **options):
        return MyModule(method=method, gate=gate), MyDataModule(seed=seed, **options)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import Callback

from ..lightning.mixin import GradSimMixin
from ..lightning.monitor import GradSimMonitor
from ..methods import is_method, list_methods
from .compare_report import write_outputs
from .registry import DEFAULT_METHODS, build_setup, list_setups, register_setup

__all__ = [
    "register_setup",
    "list_setups",
    "build_setup",
    "compare",
    "CompareResult",
    "RunSpec",
    "run_one",
    "DEFAULT_METHODS",
]


@dataclass(frozen=True)
class RunSpec:
    """One training run of :func:`compare`."""

    setup: str
    method: str
    seed: int
    options: dict[str, Any]
    gate: dict[str, Any]
    variant: str
    max_steps: int
    eval_every: int
    log_every: int = 1
    trainer: dict[str, Any] = field(default_factory=dict)
    #: best-epoch selection: ``{"monitor": "val/auroc", "mode": "max", "patience": 5}`` tests the
    #: weights of the best validation (patience > 0 also stops early on that metric); empty: last weights.
    select: dict[str, Any] = field(default_factory=dict)


class _ValCurve(Callback):
    """Records ``(global_step, val/acc)`` after every validation."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.acc: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        self.steps.append(int(trainer.global_step))
        self.acc.append(float(trainer.callback_metrics["val/acc"]))


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and test one run; returns its row (``test_acc``, ``test_error``...) and curves."""
    import torch

    torch.set_num_threads(int(os.environ.get("GRADSIM_THREADS", "1")))
    L.seed_everything(spec.seed, workers=True, verbose=False)
    module, datamodule = build_setup(spec.setup, spec.method, spec.seed, spec.gate, **spec.options)
    if spec.trainer.get("logger") in (None, False) and isinstance(module, GradSimMixin):
        module.gradsim_log_losses = False  # nobody reads them without a logger; self.log costs ~1/3 of a step
    curve = _ValCurve()
    monitor = GradSimMonitor(logging_interval=spec.log_every)
    trainer_kwargs: dict[str, Any] = dict(
        max_steps=spec.max_steps,
        max_epochs=-1,
        val_check_interval=spec.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[curve, monitor],
    )
    trainer_kwargs.update(spec.trainer)
    best = None
    if spec.select:
        from lightning.pytorch.callbacks import EarlyStopping

        from .selection import BestEpoch

        watched, mode = spec.select.get("monitor", "val/auroc"), spec.select.get("mode", "max")
        best = BestEpoch(watched, mode)
        trainer_kwargs["callbacks"] = [*trainer_kwargs["callbacks"], best]
        if int(spec.select.get("patience", 0)) > 0:
            patience = int(spec.select["patience"])
            trainer_kwargs["callbacks"].append(EarlyStopping(monitor=watched, mode=mode, patience=patience))
    start = time.perf_counter()
    trainer = L.Trainer(**trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    if best is not None:
        best.restore(module)
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    seconds = time.perf_counter() - start
    if "test/acc" not in test:
        raise KeyError(f"Setup {spec.setup!r} logged {sorted(test)} in test but not 'test/acc' (main-task accuracy).")
    acc = float(test["test/acc"])
    cos = {k.rsplit("/", 1)[1]: v for k, v in monitor.history.items() if k.startswith("gradsim/cos/")}
    row = {
        "setup": spec.setup,
        "variant": spec.variant,
        "method": spec.method,
        "seed": spec.seed,
        "test_acc": acc,
        "test_error": 1.0 - acc,
        "test_auroc": float(test["test/auroc"]) if "test/auroc" in test else None,
        "steps": int(trainer.global_step),
        "seconds": round(seconds, 2),
    }
    if best is not None:  # the tested weights are those of this validation
        row.update(selected_step=best.best_step, selected_validation=best.best + 1, selected_value=best.best_value)
    return {
        "row": row,
        "val_steps": curve.steps,
        "val_acc": curve.acc,
        "cos_steps": monitor.history.get("step", []),
        "cos": cos,
        # the gate's decisions at the same steps, for `gradsim report` (cos is above)
        "gradsim": {k: v for k, v in monitor.history.items() if k.count("/") >= 2 and k.split("/")[-2] in _DECISION},
    }


#: monitor keys kept per run in result.json beside the cosine (``gradsim report`` reads them).
_DECISION = ("cos_smoothed", "weight", "gate_open", "open_fraction", "cos_mean", "cos_se", "noise_decided")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


@dataclass
class CompareResult:
    """Outcome of :func:`compare`: ``rows`` (one per run), ``summary`` (per variant and method), files."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    methods: list[str]
    variants: list[str]
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self, metric: str = "error") -> str:
        """The table: one row per method, one column per variant, ``mean ± std`` of the test
        error in % (``metric="error"``) or of the test AUC (``metric="auroc"``, when logged)."""
        if metric not in ("error", "auroc"):
            raise ValueError(f"metric must be 'error' or 'auroc', got {metric!r}.")
        cell = {(s["method"], s["variant"]): s for s in self.summary}
        header = "| method | " + " | ".join(self.variants) + " |"
        lines = [header, "|" + "---|" * (len(self.variants) + 1)]
        for m in self.methods:
            vals = []
            for v in self.variants:
                s = cell.get((m, v))
                if s is None or f"mean_{metric}" not in s:
                    vals.append("")
                elif metric == "error":
                    vals.append(f"{100 * s['mean_error']:.2f} ± {100 * s['std_error']:.2f}")
                else:
                    vals.append(f"{s['mean_auroc']:.4f} ± {s['std_auroc']:.4f}")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        n = max((s["n"] for s in self.summary), default=0)
        lines.append("")
        what = "Main-task test error (%)" if metric == "error" else "Main-task test AUC"
        chosen = " (weights of the best validation)" if any("selected_step" in r for r in self.rows) else ""
        lines.append(f"{what}{chosen}, mean ± std over {n} seed(s).")
        return "\n".join(lines)

    @property
    def has_auroc(self) -> bool:
        return bool(self.rows) and all(r.get("test_auroc") is not None for r in self.rows)


def _variant_grid(variants: Mapping[str, Iterable[Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    if not variants:
        return [("default", {})]
    keys = list(variants)
    grid = []
    for values in product(*(list(variants[k]) for k in keys)):
        label = ",".join(f"{k}={v}" for k, v in zip(keys, values))
        grid.append((label, dict(zip(keys, values))))
    return grid


def compare(
    setup: str = "rotated_digits",
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Mapping[str, Iterable[Any]] | None = None,
    options: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    max_steps: int = 500,
    eval_every: int = 50,
    log_every: int = 1,
    out_dir: str | os.PathLike | None = "runs/compare",
    jobs: int = 1,
    progress: bool = True,
    trainer: Mapping[str, Any] | None = None,
    select: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> CompareResult:
    """Run every method over every seed (and variant) of ``setup``; tabulate the main task's test error.

    Args:
        setup: a registered setup (see :func:`list_setups`).
        methods: method names (see :func:`lightning_gradsim.methods.list_methods`).
        seeds: training seeds; the table reports mean ± std over them.
        variants: ``{option: [values]}`` grid of setup options, one table column per combination.
        options: setup options shared by every run; gate: gate keyword arguments for every method.
        max_steps, eval_every: training steps per run, and steps between validations (curves).
        log_every: steps between cosine records.
        out_dir: folder for the CSV/Markdown/PNG/JSON files; ``None`` writes nothing.
        jobs: runs in parallel processes (forked; use the number of free cores).
        progress: show a progress bar over runs.
        trainer: extra ``lightning.Trainer`` keyword arguments (e.g. ``{"accelerator": "gpu"}``).
        select: best-epoch selection, e.g. ``{"monitor": "val/auroc", "mode": "max", "patience": 5}``:
            each run is tested with the weights of its best validation (and stops early on that
            metric when ``patience > 0``); ``runs.csv`` then names the selected validation.
        resume: with ``out_dir``, each finished run is kept in ``out_dir/finished/`` as it ends
            (:mod:`~lightning_gradsim.experiments.compare_store`); ``resume=True`` reuses the runs
            kept there by a compare that did not end, and runs only the others.
    """
    methods = list(methods)
    if not methods:
        raise ValueError("compare() needs at least one method, e.g. methods=['main_only', 'sum', 'unweighted'].")
    _check_one_process_per_run(trainer)
    known = list_methods()
    unknown = [m for m in methods if not is_method(m)]
    if unknown:
        raise ValueError(
            f"Unknown method(s) {unknown}; choose from {', '.join(known)}, or a torchjd weighting 'torchjd:<Name>'."
        )
    if not seeds:
        raise ValueError("compare() needs at least one seed.")
    if max_steps < 1 or eval_every < 1:
        raise ValueError(f"max_steps and eval_every must be >= 1, got {max_steps} and {eval_every}.")
    if setup not in list_setups():
        raise ValueError(f"Unknown setup {setup!r}; choose from {', '.join(list_setups())}.")
    grid = _variant_grid(variants)
    specs = [
        RunSpec(
            setup,
            m,
            int(s),
            {**dict(options or {}), **opts},
            dict(gate or {}),
            label,
            max_steps,
            eval_every,
            log_every,
            dict(trainer or {}),
            dict(select or {}),
        )
        for (label, opts), m, s in product(grid, methods, seeds)
    ]
    from .compare_store import RunStore

    store = RunStore(out_dir, resume) if out_dir is not None else None
    runs = _execute(specs, jobs, progress, store)
    rows = [r["row"] for r in runs]
    summary = []
    for label, _ in grid:
        for m in methods:
            errors = [r["test_error"] for r in rows if r["variant"] == label and r["method"] == m]
            mean, std = _mean_std(errors)
            entry = {"variant": label, "method": m, "n": len(errors), "mean_error": mean, "std_error": std}
            aucs = [r["test_auroc"] for r in rows if r["variant"] == label and r["method"] == m]
            if aucs and all(a is not None for a in aucs):
                entry["mean_auroc"], entry["std_auroc"] = _mean_std(aucs)
            summary.append(entry)
    result = CompareResult(rows, summary, runs, methods, [label for label, _ in grid])
    if out_dir is not None:
        result.files = write_outputs(result, Path(out_dir), setup)
    if store is not None:
        store.clear()
    return result


def _check_one_process_per_run(trainer: Mapping[str, Any] | None) -> None:
    """Refuse trainer settings that make one run several processes: compare parallelises runs (``jobs``), not a run.

    Lightning would start the other ranks by re-running the whole ``gradsim compare`` command (or, in
    a ``jobs`` worker, could not start them at all).
    """
    trainer = dict(trainer or {})
    devices, num_nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    strategy = trainer.get("strategy", "auto")
    if isinstance(devices, str):
        parts = [d for d in devices.split(",") if d.strip()]
        devices = len(parts) if "," in devices else (int(devices) if devices.strip().lstrip("-").isdigit() else devices)
    n_devices = len(devices) if isinstance(devices, (list, tuple)) else devices
    name = (strategy if isinstance(strategy, str) else type(strategy).__name__).lower()
    if n_devices != 1 or int(num_nodes) != 1 or any(k in name for k in ("ddp", "fsdp", "deepspeed")):
        raise ValueError(
            f"gradsim compare trains each run in one process and runs them in parallel with jobs=; trainer="
            f"{trainer} asks for several processes per run (devices={trainer.get('devices', 1)!r}, "
            f"num_nodes={num_nodes!r}, strategy={strategy!r}). Use devices=1 (accelerator='gpu' for a GPU) and "
            "jobs= for parallel runs; for one long run on several GPUs use `gradsim fit --config <a _ddp config>`."
        )


def _execute(specs: list[RunSpec], jobs: int, progress: bool, store: Any = None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    out: list[dict[str, Any] | None] = [store.get(s) if store is not None else None for s in specs]
    todo = [i for i, r in enumerate(out) if r is None]
    bar = tqdm(
        total=len(specs), initial=len(specs) - len(todo), desc="gradsim compare", unit="run", disable=not progress
    )

    def done(i: int, res: dict[str, Any]) -> None:
        out[i] = res
        if store is not None:
            store.put(specs[i], res)  # kept as soon as it ends: a crash later loses nothing of it
        bar.update()

    try:
        if jobs <= 1:
            for i in todo:
                spec = specs[i]
                bar.set_postfix_str(f"{spec.variant} {spec.method} seed={spec.seed}")
                done(i, run_one(spec))
        elif todo:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(jobs) as pool:
                for i, res in pool.imap_unordered(_indexed_run, [(i, specs[i]) for i in todo]):
                    done(i, res)
    finally:
        bar.close()
    return [r for r in out if r is not None]


def _indexed_run(item: tuple[int, RunSpec]) -> tuple[int, dict[str, Any]]:
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return item[0], run_one(item[1])
