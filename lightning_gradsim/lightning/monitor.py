"""``GradSimMonitor``: log and draw the gate's cosine and state during training."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from ..core.gate import GateStats, GradientGate

__all__ = ["GradSimMonitor"]

#: the per-task metrics of a decision, not logged for a task whose cosine was not measured
DECISION_KEYS = ("cos", "cos_smoothed", "weight", "gate_open")


class GradSimMonitor(Callback):
    """Log the gate's per-step statistics to every Lightning logger, and optionally plot them.

    Metric names (``<task>`` is each auxiliary task's name):

    ==================================  ===================================================
    ``gradsim/cos/<task>``              this step's cosine with the main gradient
    ``gradsim/cos_smoothed/<task>``     the cosine the rule used (EMA when ``cosine_ema``)
    ``gradsim/weight/<task>``           coefficient applied to the auxiliary gradient
    ``gradsim/gate_open/<task>``        1 if the auxiliary gradient was used, else 0
    ``gradsim/measured/<task>``         1 if the cosine was measured, 0 if the auxiliary gradient was
                                        zero on the shared parameters (then no cos/weight/gate_open)
    ``gradsim/cos_mean/<task>``         mean measured cosine so far (``GateState.cosine_summary``)
    ``gradsim/cos_se/<task>``           its standard error (batch means over windows of 25 steps)
    ``gradsim/noise_decided/<task>``    fraction of decisions on a cosine within 2 SE of the threshold
    ``gradsim/open_fraction/<task>``    fraction of measured steps with the gate open
    ``gradsim/grad_norm/main``          norm of the main gradient on the shared parameters
    ``gradsim/grad_norm/<task>``        norm of the auxiliary gradient
    ``gradsim/skipped_steps``           steps skipped for a non-finite loss or gradient
    ``gradsim/skipped``                 1 if this batch's step was skipped, else 0 (a skipped step
                                        logs no cos/weight/gate_open/grad_norm: it decided nothing)
    ``gradsim/task_weight/<task>``      loss weight of each task, main included (``uncertainty``,
                                        ``gradnorm``; see ``GradientGate.extra_metrics``)
    ``gradsim/log_var/<task>``          learned log-variance ``s`` of each task (``uncertainty``)
    ==================================  ===================================================

    With several gates in one module, names get the gate's module path: ``gradsim/<path>/cos/...``.
    Metrics are logged at the step number Lightning gives the batch's ``self.log`` calls
    (``train/loss`` of the same batch has the same x position).

    Args:
        logging_interval: log every this many training steps (reading the values costs one
            host-device sync per logged step, none in between).
        plot: ``False``; ``True`` to save ``gradsim.png`` in the trainer's log directory at the end
            of fit; or a file path for the PNG.

    >>> monitor = GradSimMonitor(logging_interval=10, plot=True)  # L.Trainer(callbacks=[monitor])
    >>> monitor.logging_interval
    10
    """

    def __init__(self, logging_interval: int = 1, plot: bool | str | os.PathLike = False) -> None:
        if logging_interval < 1:
            raise ValueError(f"logging_interval must be >= 1, got {logging_interval}.")
        self.logging_interval = int(logging_interval)
        self.plot = plot
        #: every logged metric's values by name, with ``step`` (NaN where a step did not log it); checkpointed
        self.history: dict[str, list[float]] = {}
        self._last_logged: dict[str, GateStats] = {}
        self._batches_seen = 0
        #: where the plot was saved at the end of fit (``None`` before, or without ``plot``)
        self.plot_path: str | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_seen += 1
        if (self._batches_seen - 1) % self.logging_interval != 0:
            return
        step = _logging_step(trainer)
        metrics: dict[str, float] = {}
        for prefix, gate in self._gates(pl_module).items():
            stats = gate.last_stats
            # The mixin knows (after its one host sync) whether the step was skipped; a gate used
            # without it reports a skipped measured step in stats.finite.
            skipped = (
                getattr(pl_module, "gradsim_last_step_skipped", None)
                if getattr(pl_module, "gradsim", None) is gate
                else None
            )
            if stats is None or gate.aux_names is None or (stats is self._last_logged.get(prefix) and not skipped):
                continue
            self._last_logged[prefix] = stats  # a reference, so a new step's stats are never mistaken for it
            metrics.update(self.metrics_from(stats, gate, prefix, skipped=skipped))
        if not metrics:
            return
        seen = len(self.history.get("step", []))
        for name in set(self.history) | set(metrics):
            if name != "step":
                # NaN where a metric was not logged (a skipped step decides nothing), so the curves align.
                self.history.setdefault(name, [float("nan")] * seen).append(metrics.get(name, float("nan")))
        self.history.setdefault("step", []).append(float(step))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plot:
            path = (
                self.plot
                if isinstance(self.plot, (str, os.PathLike))
                else os.path.join(trainer.log_dir or trainer.default_root_dir, "gradsim.png")
            )
            self.plot_path = str(path)
            self._save_plot(self.plot_path)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict.get("history", {}).items()}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def metrics_from(
        stats: GateStats, gate: GradientGate, prefix: str = "gradsim", skipped: bool | None = None
    ) -> dict[str, float]:
        """The logged metrics of one step, as Python floats (one host sync).

        ``skipped``: whether the step was skipped (``None``: read it from ``stats.finite``). A skipped
        step logs ``<prefix>/skipped = 1`` and the gate's state, not the decision it did not take.

        >>> import torch
        >>> gate = GradientGate(rule="weighted")
        >>> _, stats = gate.combine(torch.tensor([1.0, 0.0]), {"a": torch.tensor([1.0, 1.0])})
        >>> metrics = GradSimMonitor.metrics_from(stats, gate)
        >>> round(metrics["gradsim/weight/a"], 4), metrics["gradsim/gate_open/a"], metrics["gradsim/skipped"]
        (0.7071, 1.0, 0.0)
        """
        names = gate.aux_names or []
        summary = [s.reshape(-1).float().to(stats.cosine.device) for s in gate.state.cosine_summary()]
        values = torch.cat(
            [
                stats.cosine.reshape(-1).float(),
                stats.smoothed_cosine.reshape(-1).float(),
                stats.weight.reshape(-1).float(),
                stats.gate_open.reshape(-1).float(),
                gate.open_fraction().reshape(-1).float().to(stats.cosine.device),
                stats.aux_norm.reshape(-1).float(),
                stats.main_norm.reshape(1).float(),
                gate.state.skipped_steps.reshape(1).float().to(stats.cosine.device),
                stats.finite.all().reshape(1).float().to(stats.cosine.device),
                (torch.ones_like(stats.gate_open) if stats.measured is None else stats.measured).reshape(-1).float(),
                *summary,
            ]
        ).tolist()
        k = len(names)
        if skipped is None:
            skipped = values[6 * k + 2] == 0.0
        out: dict[str, float] = {}
        summary_values: dict[str, float] = {}
        measured = values[6 * k + 3 : 7 * k + 3]
        for block, key in enumerate(["cos_mean", "cos_se", "noise_decided"]):
            if summary[0].numel() == k:  # one problem (not a batch of them)
                for i, name in enumerate(names):
                    out_key = f"{prefix}/{key}/{name}"
                    summary_values[out_key] = values[7 * k + 3 + block * k + i]
        for block, key in enumerate(["cos", "cos_smoothed", "weight", "gate_open", "open_fraction", "grad_norm"]):
            if skipped and key != "open_fraction":
                continue
            for i, name in enumerate(names):
                if key in DECISION_KEYS and not measured[i]:
                    continue  # not measured (no gradient on the shared parameters): no cosine, no decision
                out[f"{prefix}/{key}/{name}"] = values[block * k + i]
        if not skipped:
            for i, name in enumerate(names):
                out[f"{prefix}/measured/{name}"] = measured[i]
        if not skipped:
            out[f"{prefix}/grad_norm/main"] = values[6 * k]
        out.update(summary_values)
        out[f"{prefix}/skipped_steps"] = values[6 * k + 1]
        out[f"{prefix}/skipped"] = float(skipped)
        extra = gate.extra_metrics()
        if extra:
            extra_values = torch.stack([v.detach().reshape(()).float().cpu() for v in extra.values()]).tolist()
            out.update({f"{prefix}/{name}": value for name, value in zip(extra, extra_values)})
        return out

    @staticmethod
    def _gates(pl_module: LightningModule) -> dict[str, GradientGate]:
        found = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, GradientGate)]
        if len(found) <= 1:
            return {"gradsim": found[0][1]} if found else {}
        return {f"gradsim/{name}": m for name, m in found}

    @rank_zero_only
    def _save_plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = self.history.get("step", [])
        cos_keys = sorted(k for k in self.history if "/cos/" in k)
        fig, (ax_cos, ax_gate) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        for key in cos_keys:
            task = key.rsplit("/cos/", 1)[1]
            prefix = key.rsplit("/cos/", 1)[0]
            line = ax_cos.plot(steps, self.history[key], alpha=0.35, lw=0.8)[0]
            smooth = self.history.get(f"{prefix}/cos_smoothed/{task}")
            if smooth is not None:
                ax_cos.plot(steps, smooth, color=line.get_color(), lw=1.5, label=task)
            weight = self.history.get(f"{prefix}/weight/{task}")
            if weight is not None:
                ax_gate.step(steps, weight, where="post", color=line.get_color(), label=task)
        ax_cos.axhline(0.0, color="grey", lw=0.6, ls=":")
        ax_cos.set_ylabel("cosine with main gradient")
        ax_cos.set_ylim(-1.05, 1.05)
        ax_gate.set_ylabel("applied aux weight")
        ax_gate.set_xlabel("training step")
        if cos_keys:
            ax_cos.legend(loc="best", fontsize="small")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _logging_step(trainer: Trainer) -> int:
    """The step Lightning logs this batch's ``self.log`` metrics at (the batches stepped so far)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if step is not None else int(trainer.global_step)
