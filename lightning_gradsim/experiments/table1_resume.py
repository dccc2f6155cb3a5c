"""``gradsim table1`` as it goes: after each finished epoch, the stacked runs' whole state and the
epoch's numbers are in the output folder, so a crash loses at most the epoch in progress.

Files (in ``--out``):

- ``table1_checkpoint.pt``: the configuration, the number of finished epochs, every run's weights,
  RMSprop's state, each method's gate state, the data-order generators and the per-epoch cosines.
  Written atomically (a temporary file, then a rename); removed once the final outputs are written.
- ``epochs.csv``: one row per run and finished epoch (mean cosine, mean main and auxiliary losses).

``gradsim table1 ... --resume`` continues from the checkpoint: the runs go on exactly as without the
interruption (same weights, optimizer and gate state, same data order). A checkpoint written with
other settings (angles, methods, seeds, epochs, ...) is refused and the differences are named.

>>> from lightning_gradsim.experiments.table1 import Table1Config
>>> sorted(config_key(Table1Config(source="digits")))[:3]
['angles', 'aux_weight', 'batch_size']
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict
from typing import Any

import torch

from ..cli_checks import UsageError

__all__ = ["CHECKPOINT", "EPOCHS_CSV", "config_key", "save_progress", "load_progress", "restore_progress"]

CHECKPOINT = "table1_checkpoint.pt"
EPOCHS_CSV = "epochs.csv"
_NOT_COMPARED = ("progress", "device")  # a run may go on elsewhere and with or without a bar


def config_key(cfg: Any) -> dict[str, Any]:
    """The settings that must be equal for a checkpoint to continue ``cfg`` (not the device or the bar)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in _NOT_COMPARED}
    key["angles"] = [float(a) for a in key["angles"]]
    key["methods"] = list(key["methods"])
    return key


def save_progress(
    out_dir: str,
    cfg: Any,
    proto: Any,
    epoch: int,
    cos_epochs: torch.Tensor,
    loss_last: torch.Tensor,
    seconds: float,
) -> None:
    """Save the state after ``epoch`` finished epochs, and append that epoch's rows to ``epochs.csv``."""
    state = {
        "version": 1,
        "config": config_key(cfg),
        "epoch": epoch,
        "model": [p.detach().cpu() for p in proto.model.parameters()],
        "optimizer": proto.trainer.optimizer.state_dict(),
        "gates": [g.gate.state_dict() for g in proto.trainer.groups],
        "order": proto.order.state_dict(),
        "cos_epochs": cos_epochs[:epoch].detach().cpu(),
        "loss_last": loss_last.detach().cpu(),
        "seconds": seconds,
    }
    path = os.path.join(out_dir, CHECKPOINT)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash while saving leaves the previous epoch's checkpoint whole
    rows_path = os.path.join(out_dir, EPOCHS_CSV)
    cos, loss = cos_epochs[epoch - 1].cpu(), loss_last.cpu()
    fields = ["epoch", "method", "angle", "seed", "mean_cosine", "train_loss_main", "train_loss_aux"]
    with open(rows_path, "w" if epoch == 1 else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if epoch == 1:
            writer.writeheader()
        for r, (si, angle, seed) in enumerate(proto.runs):
            writer.writerow(
                {
                    "epoch": epoch,
                    "method": proto.specs[si].label,
                    "angle": angle,
                    "seed": seed,
                    "mean_cosine": float(cos[r]),
                    "train_loss_main": float(loss[r, 0]),
                    "train_loss_aux": float(loss[r, 1]),
                }
            )


def load_progress(out_dir: str, cfg: Any) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir`` (``None`` if there is none); refuses one written with other settings."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"{path} cannot be read ({type(err).__name__}: {err}); delete it to start afresh.") from None
    want = config_key(cfg)
    if state.get("config") != want:
        old = state.get("config") or {}
        keys = sorted(set(old) | set(want))
        diff = [f"{k}: {old.get(k)!r} there, {want.get(k)!r} now" for k in keys if old.get(k) != want.get(k)]
        raise UsageError(
            f"{path} continues a run with other settings ({'; '.join(diff)}): give the same settings, "
            "or another --out to start a new run."
        )
    return state


@torch.no_grad()
def restore_progress(proto: Any, state: dict[str, Any]) -> None:
    """Put a checkpoint's weights, optimizer, gate and data-order state into a freshly built protocol."""
    for p, saved in zip(proto.model.parameters(), state["model"]):
        p.copy_(saved)  # in place: the optimizer's per-method views share this storage
    proto.trainer.optimizer.load_state_dict(state["optimizer"])
    for group, saved in zip(proto.trainer.groups, state["gates"]):
        group.gate.load_state_dict(saved)
    proto.order.load_state_dict(state["order"])
