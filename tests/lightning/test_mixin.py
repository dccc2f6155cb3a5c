"""GradSimMixin against reference LightningModules trained with plain automatic optimization."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradsim import GradientGate, GradSimMixin, NonFiniteLossError


def make_loader(n=48, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    y_aux = (x[:, 2] > 0).long()
    return DataLoader(TensorDataset(x, y, y_aux), batch_size=batch_size, shuffle=False)


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.main_head = nn.Linear(16, 2)
        self.aux_head = nn.Linear(16, 2)


def optimizer_config(module, optimizer="sgd", scheduler=None):
    if optimizer == "sgd":
        opt = torch.optim.SGD(module.parameters(), lr=0.2, momentum=0.9)
    else:
        opt = torch.optim.Adam(module.parameters(), lr=0.01)
    if scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}
    if scheduler == "epoch":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 1}}
    return opt


class GatedNet(GradSimMixin, L.LightningModule):
    def __init__(self, rule="sum", optimizer="sgd", scheduler=None, **gate_kwargs):
        super().__init__()
        body = Body()
        self.trunk, self.main_head, self.aux_head = body.trunk, body.main_head, body.aux_head
        self.gradsim = GradientGate(rule=rule, **gate_kwargs)
        self.opt_name, self.sched_name = optimizer, scheduler

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y, y_aux = batch
        h = self.trunk(x)
        return {"main": F.cross_entropy(self.main_head(h), y), "parity": F.cross_entropy(self.aux_head(h), y_aux)}

    def configure_optimizers(self):
        return optimizer_config(self, self.opt_name, self.sched_name)


class ReferenceNet(L.LightningModule):
    """Plain automatic optimization: main + aux (sum), or main with a detached trunk for aux (main_only)."""

    def __init__(self, mode="sum", optimizer="sgd", scheduler=None):
        super().__init__()
        body = Body()
        self.trunk, self.main_head, self.aux_head = body.trunk, body.main_head, body.aux_head
        self.mode, self.opt_name, self.sched_name = mode, optimizer, scheduler

    def training_step(self, batch, batch_idx):
        x, y, y_aux = batch
        h = self.trunk(x)
        h_aux = h if self.mode == "sum" else h.detach()
        return F.cross_entropy(self.main_head(h), y) + F.cross_entropy(self.aux_head(h_aux), y_aux)

    def configure_optimizers(self):
        return optimizer_config(self, self.opt_name, self.sched_name)


def trainer(**kw):
    defaults = dict(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


def assert_same_params(a, b, atol=1e-6):
    pa = dict(a.named_parameters())
    for name, p in b.named_parameters():
        assert torch.allclose(pa[name], p, atol=atol), name


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "step"), ("adam", "epoch"), ("sgd", None)])
def test_sum_rule_trains_exactly_like_automatic_optimization(optimizer, scheduler):
    gated, ref = GatedNet("sum", optimizer, scheduler), ReferenceNet("sum", optimizer, scheduler)
    assert_same_params(gated, ref, atol=0)
    trainer().fit(gated, make_loader())
    t = trainer()
    t.fit(ref, make_loader())
    assert_same_params(gated, ref)
    assert gated.optimizers().param_groups[0]["lr"] == pytest.approx(ref.optimizers().param_groups[0]["lr"])
    assert gated.global_step == t.global_step == 12


def test_main_only_trains_the_trunk_on_the_main_task_alone():
    gated, ref = GatedNet("main_only"), ReferenceNet("main_only")
    trainer().fit(gated, make_loader())
    trainer().fit(ref, make_loader())
    assert_same_params(gated, ref)
    # the aux head still learned from its own loss
    assert not torch.allclose(gated.aux_head.weight, Body().aux_head.weight)


def test_gradient_clipping_on_the_combined_gradient_matches_trainer_clipping():
    gated, ref = GatedNet("sum"), ReferenceNet("sum")
    gated.gradsim_clip_val = 0.05
    trainer().fit(gated, make_loader())
    trainer(gradient_clip_val=0.05).fit(ref, make_loader())
    assert_same_params(gated, ref)


def test_trainer_gradient_clip_flag_is_refused_with_the_fix():
    with pytest.raises(MisconfigurationException, match="gradsim_clip_val = 1.0"):
        trainer(gradient_clip_val=1.0).fit(GatedNet(), make_loader())
    with pytest.raises(MisconfigurationException, match="gradsim_accumulate_grad_batches = 2"):
        trainer(accumulate_grad_batches=2).fit(GatedNet(), make_loader())


def test_plateau_scheduler_on_an_epoch_interval_is_stepped_with_its_metric():
    class Plateau(GatedNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "always_one"}}

        def on_train_epoch_start(self):
            self.log("always_one", 1.0)

    model = Plateau()
    trainer(max_epochs=3).fit(model, make_loader())
    # epoch 1 sets the best value; epochs 2 and 3 do not improve: two halvings
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(0.025)


class Bad(GatedNet):
    def __init__(self, losses_fn=None, shared=None, **kw):
        super().__init__(**kw)
        self.losses_fn, self.shared = losses_fn, shared

    def task_losses(self, batch, batch_idx):
        losses = super().task_losses(batch, batch_idx)
        return self.losses_fn(losses) if self.losses_fn else losses

    def shared_parameters(self):
        return self.shared if self.shared is not None else super().shared_parameters()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(losses_fn=lambda d: {"primary": d["main"], "aux": d["parity"]}), KeyError, "no 'main'"),
        (dict(losses_fn=lambda d: {"main": d["main"]}), ValueError, "at least one auxiliary task"),
        (dict(losses_fn=lambda d: [d["main"]]), TypeError, "dict of losses"),
        (dict(shared=[]), ValueError, "shared_parameters\\(\\) returned no trainable parameter"),
    ],
)
def test_misconfigured_modules_raise_errors_that_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        trainer(max_steps=1).fit(Bad(**kwargs), make_loader())


def test_shared_parameters_unrelated_to_the_losses_is_an_error():
    model = Bad()
    model.shared = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="main loss does not depend on any shared parameter"):
        trainer(max_steps=1).fit(model, make_loader())


def test_missing_gate_is_an_error():
    model = GatedNet()
    del model.gradsim
    with pytest.raises(AttributeError, match="self.gradsim = GradientGate"):
        trainer(max_steps=1).fit(model, make_loader())
    from lightning_gradsim.loss_weighting import UncertaintyWeighting

    model.gradsim = UncertaintyWeighting()  # a loss weighting is not a gate (it was in 0.1.0)
    with pytest.raises(AttributeError, match="compose it with a gate.*loss_weighting=UncertaintyWeighting"):
        trainer(max_steps=1).fit(model, make_loader())


def test_defining_training_step_or_wrong_base_order_fails_at_class_creation():
    with pytest.raises(TypeError, match="defines training_step"):

        class WithStep(GradSimMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                return None

    with pytest.raises(TypeError, match="put GradSimMixin before LightningModule"):

        class WrongOrder(L.LightningModule, GradSimMixin):
            pass


def test_non_finite_loss_skips_the_step_warns_once_and_counts():
    class Flaky(GatedNet):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            if batch_idx in (1, 3):
                losses["parity"] = losses["parity"] * float("inf")
            return losses

    model = Flaky(rule="unweighted", cosine_ema=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient in task\\(s\\) \\['parity'\\]") as record:
        trainer(max_epochs=1).fit(model, make_loader())
    assert sum("non-finite" in str(w.message) for w in record) == 1
    assert model.global_step == 4  # 6 batches, 2 skipped
    assert model.gradsim.skipped_steps.item() == 2
    assert model.gradsim.measured_steps.item() == 4
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_non_finite_loss_skip_leaves_parameters_and_gate_untouched():
    class AlwaysNan(GatedNet):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            losses["main"] = losses["main"] * float("nan")
            return losses

    model = AlwaysNan(rule="unweighted", cosine_ema=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning):
        trainer(max_steps=3, max_epochs=1).fit(model, make_loader())
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p), n
    assert model.gradsim.measured_steps.item() == 0


def test_on_nonfinite_raise():
    class Nan(GatedNet):
        gradsim_on_nonfinite = "raise"

        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            losses["parity"] = losses["parity"] * float("nan")
            return losses

    with pytest.raises(NonFiniteLossError, match="parity"):
        trainer(max_steps=1).fit(Nan(), make_loader())


def test_losses_are_logged():
    model = GatedNet()
    t = trainer(max_steps=2)
    t.fit(model, make_loader())
    assert {"train/loss", "train/loss/main", "train/loss/parity"} <= set(t.callback_metrics)


# ---------------------------------------------------------------- issue 13: holes found in review
def _params_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_gradient_on_a_head_with_a_finite_loss_skips_the_step():
    """The fast path (no transforms): the head's gradient is checked too, not only the trunk's."""

    class HeadNan(GatedNet):
        def task_losses(self, batch, batch_idx):
            x, y, y_aux = batch
            h = self.trunk(x)
            weight = self.main_head.weight * 1.0
            if batch_idx == 1:
                weight.register_hook(lambda g: g * float("nan"))  # reaches main_head.weight only
            main = F.cross_entropy(F.linear(h, weight, self.main_head.bias), y)
            return {"main": main, "parity": F.cross_entropy(self.aux_head(h), y_aux)}

    model = HeadNan(rule="unweighted")
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient"):
        trainer(max_epochs=1).fit(model, make_loader())
    assert _params_finite(model)
    assert model.global_step == 5 and model.gradsim.skipped_steps.item() == 1


def test_a_reused_step_with_an_inf_gradient_skips_the_step():
    class Overflow(GatedNet):
        def task_losses(self, batch, batch_idx):
            losses = super().task_losses(batch, batch_idx)
            if batch_idx == 1:  # with every_n_steps=2: a step that reuses the last weights
                x, y, y_aux = batch
                h = self.trunk(x) * 1.0
                h.register_hook(lambda g: torch.full_like(g, float("inf")))
                losses["parity"] = F.cross_entropy(self.aux_head(h), y_aux)
            return losses

    model = Overflow(rule="unweighted", every_n_steps=2)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient"):
        trainer(max_epochs=1).fit(model, make_loader())
    assert _params_finite(model)
    assert model.global_step == 5 and model.gradsim.skipped_steps.item() == 1
    assert model.gradsim_last_step_skipped is False


@pytest.mark.parametrize(
    "losses_fn,error,match",
    [
        (
            lambda d: {"main": d["main"], "parity": 0.5},
            TypeError,
            "task_losses\\(\\)\\['parity'\\] is a float, not a tensor",
        ),
        (lambda d: {"main": d["main"], 1: d["parity"], "1": d["parity"]}, ValueError, "collide as names"),
    ],
)
def test_bad_task_losses_are_clear_errors(losses_fn, error, match):
    with pytest.raises(error, match=match):
        trainer(max_steps=1).fit(Bad(losses_fn=losses_fn), make_loader())


def test_an_auxiliary_loss_without_grad_warns_once():
    model = Bad(losses_fn=lambda d: {"main": d["main"], "parity": d["parity"].detach()})
    with pytest.warns(UserWarning, match="task_losses\\(\\)\\['parity'\\] does not require grad") as record:
        trainer(max_steps=3).fit(model, make_loader())
    assert sum("does not require grad" in str(w.message) for w in record) == 1
    assert model.global_step == 3


def test_options_the_gate_cannot_combine_with_the_trainer_are_refused_before_any_step():
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = GatedNet(rule="unweighted", similarity="features")
    model.gradsim_accumulate_grad_batches = 2
    with pytest.raises(MisconfigurationException, match="similarity='features'.*gradsim_accumulate_grad_batches = 2"):
        trainer(max_steps=1).fit(model, make_loader())
    assert all(p.grad is None for p in model.parameters()) and model.gradsim.step.item() == 0
    model = GatedNet(rule="unweighted", every_n_steps=3)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(MisconfigurationException, match="every_n_steps=3.*16-mixed precision"):
        trainer(max_steps=1, plugins=[amp]).fit(model, make_loader())
    assert all(p.grad is None for p in model.parameters())
