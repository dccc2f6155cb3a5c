"""Stopping and resuming from a checkpoint (mid-epoch, mid-accumulation window, under a GradScaler)
continues like the uninterrupted run: weights, gate state, optimizer, scheduler and scaler state.
(The DDP resume runs in tests/parallel/test_ddp.py.)"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from ..scale_utils import BatchList, TinyNet, fit, make_batches, params, trainer
from .test_precision import scaler_plugin

GATE = {"main_grad_ema": 0.5, "cosine_ema": 0.5}


def _assert_same_state(resumed: TinyNet, full: TinyNet, skip_log: int) -> None:
    for name, p in params(full).items():
        torch.testing.assert_close(params(resumed)[name], p, atol=1e-6, rtol=0, msg=name)
    full_state, resumed_state = full.gradsim.state_dict(), resumed.gradsim.state_dict()
    for key, value in full_state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed_state[key], value, atol=1e-6, rtol=0, msg=key)
    full_opt = full.trainer.optimizers[0].state_dict()
    resumed_opt = resumed.trainer.optimizers[0].state_dict()
    for idx, state in full_opt["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(resumed_opt["state"][idx][key], value, atol=1e-6, rtol=0)
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        full.trainer.optimizers[0].param_groups[0]["lr"]
    )
    assert resumed.global_step == full.global_step
    # The steps after the checkpoint took the same gate decisions.
    assert [o for _, o, _ in resumed.gate_log] == [o for _, o, _ in full.gate_log[skip_log:]]


class SaveAt(Callback):
    """Save a checkpoint at the end of the given (epoch, batch_idx) pairs, e.g. mid accumulation window."""

    def __init__(self, dirpath, at):
        self.dirpath, self.at = dirpath, set(at)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) in self.at:
            trainer.save_checkpoint(os.path.join(self.dirpath, f"e{trainer.current_epoch}b{batch_idx}.ckpt"))


@pytest.mark.parametrize("rule, optimizer", [("projection", "adam"), ("unweighted", "sgd")])
def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, rule, optimizer):
    batches = make_batches(5, 8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = fit(
        TinyNet(rule, optimizer, GATE, scheduler=True),
        batches,
        max_epochs=2,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    assert full.global_step == 10
    for step in (3, 6):  # epoch 0 batch 2, epoch 1 batch 0: both mid-epoch
        resumed = TinyNet(rule, optimizer, GATE, scheduler=True, seed=99)  # other init: all must come from the file
        fit(resumed, batches, max_epochs=2, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        _assert_same_state(resumed, full, skip_log=step)


def test_resume_is_discriminative(tmp_path):
    """Guard: a restart that forgets the gate state (fresh gate, same weights) ends elsewhere."""
    batches = make_batches(5, 8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = fit(TinyNet("projection", "adam", GATE), batches, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("gradsim.")}
    torch.save(state, tmp_path / "no_gate.ckpt")
    resumed = TinyNet("projection", "adam", GATE)
    resumed.strict_loading = False
    fit(resumed, batches, max_epochs=2, ckpt_path=str(tmp_path / "no_gate.ckpt"))
    assert not torch.allclose(resumed.trunk[0].weight, full.trunk[0].weight, atol=1e-5)


def test_resume_mid_accumulation_window_under_a_grad_scaler(tmp_path):
    batches = make_batches(6, 8)
    kwargs = dict(accumulate=2, scheduler=True)
    saver = SaveAt(tmp_path, at={(0, 2), (1, 4)})  # the first micro-batch of a window: half accumulated
    full = fit(
        TinyNet("projection", "adam", GATE, **kwargs),
        batches,
        max_epochs=2,
        callbacks=[saver],
        plugins=[scaler_plugin(init_scale=2.0**6, growth_interval=2)],
    )
    full_scale = full.trainer.precision_plugin.scaler.get_scale()
    assert full_scale != 2.0**6  # the scale moved, so resuming it matters
    for name, skip in (("e0b2", 1), ("e1b4", 5)):
        ckpt = torch.load(tmp_path / f"{name}.ckpt", weights_only=False)
        assert ckpt["gradsim_accumulator"]["count"] == 1
        resumed = TinyNet("projection", "adam", GATE, seed=7, **kwargs)
        fit(
            resumed,
            batches,
            max_epochs=2,
            ckpt_path=str(tmp_path / f"{name}.ckpt"),
            plugins=[scaler_plugin(init_scale=2.0**6, growth_interval=2)],
        )
        _assert_same_state(resumed, full, skip_log=skip)
        assert resumed.trainer.precision_plugin.scaler.get_scale() == full_scale


def test_resume_with_every_n_steps_continues_the_measuring_cycle(tmp_path):
    """The call counter and the weights being reused are in the checkpoint: a run resumed between two
    measured steps reuses what the uninterrupted run reuses."""
    batches = make_batches(5, 8)
    gate = {"every_n_steps": 3, "cosine_ema": 0.5}
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    full = fit(TinyNet("weighted", "adam", gate), batches, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    assert int(full.gradsim.measured_steps) == 4  # calls 0, 3, 6, 9 of 10
    for step in (2, 4):  # both between two measured steps
        resumed = TinyNet("weighted", "adam", gate, seed=99)
        fit(resumed, batches, max_epochs=2, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        _assert_same_state(resumed, full, skip_log=step)
        assert int(resumed.gradsim.measured_steps) == 4


class PlainNet(L.LightningModule):
    """TinyNet's network trained without GradSimMixin (automatic optimization on the summed loss)."""

    def __init__(self):
        super().__init__()
        twin = TinyNet()
        self.trunk, self.main_head, self.aux_head = twin.trunk, twin.main_head, twin.aux_head

    def training_step(self, batch, batch_idx):
        x, y, y_aux = batch
        h = self.trunk(x)
        return F.cross_entropy(self.main_head(h), y) + F.cross_entropy(self.aux_head(h), y_aux)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_checkpoint_without_gate_state_starts_a_fresh_gate_and_says_so(tmp_path):
    batches = make_batches(4, 8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    plain = PlainNet()
    trainer(max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(plain, train_dataloaders=BatchList(batches))
    path = str(tmp_path / "step=2.ckpt")
    model = TinyNet()
    with pytest.warns(UserWarning, match="no state for the gate `gradsim`.*starting a fresh gate"):
        trainer(max_epochs=1).fit(model, train_dataloaders=BatchList(batches), ckpt_path=path)
    assert int(model.gradsim.step) == 2  # the two batches after the checkpoint, with a fresh gate
    with pytest.warns(UserWarning, match="starting a fresh gate"):
        loaded = TinyNet.load_from_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    torch.testing.assert_close(loaded.trunk[0].weight, saved["trunk.0.weight"])


@pytest.mark.parametrize(
    "method, gate",
    [("gradvac", {"beta": 0.3}), ("dwa", {"period": 2}), ("rlw", {"seed": 3}), ("torchjd:GradVac", {})],
)
def test_resume_of_stateful_rules_and_loss_weightings(tmp_path, method, gate):
    """GradVac's EMA targets, DWA's loss history, RLW's generator and a torchjd weighting's state are in the
    checkpoint: resuming mid-epoch equals the uninterrupted run."""
    if method.startswith("torchjd:"):
        pytest.importorskip("torchjd", reason='torchjd is not installed: pip install -e ".[torchjd]"')
    batches = make_batches(5, 8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    kwargs = {"method": method, "optimizer": "sgd", "gate": gate}
    full = fit(TinyNet(**kwargs), batches, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    resumed = TinyNet(**kwargs, seed=99)
    fit(resumed, batches, max_epochs=2, ckpt_path=str(tmp_path / "step=6.ckpt"))
    _assert_same_state(resumed, full, skip_log=6)
