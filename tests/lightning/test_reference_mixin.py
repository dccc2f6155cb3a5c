"""The mixin's held-out reference (issue 23, item 2): a module that defines ``reference_loss(batch)`` gets one
reference batch per measured step from ``trainer.datamodule.reference_dataloader()``; the run equals the gate
called by hand with the same batches, draws nothing on steps that reuse weights, and resumes exactly."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from ..scale_utils import BatchList, TinyNet, make_batches, params, trainer


class RefNet(TinyNet):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reference_batches_seen = 0

    def reference_loss(self, batch):
        x, y, _ = batch
        self.reference_batches_seen += 1
        return F.cross_entropy(self.main_head(self.trunk(x)), y)


class RefData(L.LightningDataModule):
    reference_fraction = 0.1

    def __init__(self, train, reference):
        super().__init__()
        self.train, self.reference = train, reference

    def train_dataloader(self):
        return BatchList(list(self.train))

    def reference_dataloader(self):
        return list(self.reference)


TRAIN, REFERENCE = make_batches(6, 8, seed=0), make_batches(4, 5, seed=1)


def _fit(model, ckpt_path=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(**kwargs).fit(model, datamodule=RefData(TRAIN, REFERENCE), ckpt_path=ckpt_path)
    return model


def test_the_mixin_with_a_reference_equals_the_gate_called_by_hand():
    model = _fit(RefNet(rule="unweighted", optimizer="sgd"))
    manual = TinyNet(rule="unweighted", optimizer="sgd")
    opt = torch.optim.SGD(manual.parameters(), lr=0.3, momentum=0.9)
    for step, (x, y, y_aux) in enumerate(TRAIN):
        opt.zero_grad()
        h = manual.trunk(x)
        main, aux = F.cross_entropy(manual.main_head(h), y), F.cross_entropy(manual.aux_head(h), y_aux)
        rx, ry, _ = REFERENCE[step % len(REFERENCE)]  # cycled: 6 steps, 4 reference batches
        ref = F.cross_entropy(manual.main_head(manual.trunk(rx)), ry)
        stats = manual.gradsim.backward(main, {"aux": aux}, list(manual.trunk.parameters()), reference_loss=ref)
        assert bool(stats.finite) and stats.against_reference
        opt.step()
    for name, p in params(manual).items():
        torch.testing.assert_close(params(model)[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert model.reference_batches_seen == 6


def test_steps_that_reuse_weights_draw_no_reference_batch():
    model = _fit(RefNet(rule="weighted", gate={"every_n_steps": 3}))
    assert model.reference_batches_seen == 2  # steps 0 and 3


def test_a_reference_run_resumes_exactly(tmp_path):
    full = _fit(RefNet(rule="weighted"))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    _fit(RefNet(rule="weighted"), callbacks=[ckpt], enable_checkpointing=True, max_steps=3)
    resumed = _fit(RefNet(rule="weighted", seed=7), ckpt_path=os.path.join(tmp_path, "step=3.ckpt"))
    for name, p in params(full).items():
        torch.testing.assert_close(params(resumed)[name], p, rtol=0, atol=0, msg=name)


def test_a_reference_loss_without_a_reference_loader_says_how_to_give_one():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="reference_fraction > 0"):
            trainer().fit(RefNet(), train_dataloaders=BatchList(list(TRAIN)))
