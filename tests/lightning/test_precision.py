"""Mixed precision: the real GradScaler path (driven on CPU with a ``MixedPrecision`` plugin and a
CPU ``torch.amp.GradScaler``, since Lightning turns ``precision="16-mixed"`` into bf16 on CPU),
and ``bf16-mixed``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from ..scale_utils import TinyNet, fit, make_batches, params


def scaler_plugin(**kwargs) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **kwargs))


class Recorder(Callback):
    """Per batch: the scale before the step, the weights after it, and unscale_ calls."""

    def __init__(self):
        self.scales, self.weights, self.grad_norms = [], [], []
        self.unscale_calls = 0

    def on_fit_start(self, trainer, pl_module):
        scaler = trainer.precision_plugin.scaler
        original = scaler.unscale_

        def counting_unscale(optimizer):
            self.unscale_calls += 1
            return original(optimizer)

        scaler.unscale_ = counting_unscale

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(params(pl_module))


def test_16_mixed_overflow_skips_the_step_backs_off_and_keeps_the_gate_clean():
    batches = make_batches(6, 8)
    rec = Recorder()
    model = TinyNet("unweighted", "sgd", {"cosine_ema": 0.5}, inject_inf_at=(2,))
    before = params(model)
    fit(model, batches, plugins=[scaler_plugin(init_scale=2.0**10, growth_interval=2)], callbacks=[rec])
    # Scale: grows after 2 clean steps, halves on the overflow at batch 2, grows again after 2 clean steps.
    assert rec.scales == [2.0**10, 2.0**10, 2.0**11, 2.0**10, 2.0**10, 2.0**11]
    assert rec.unscale_calls == 0  # the mixin unscaled the per-task gradients itself, once
    assert model.global_step == 5  # the overflowed batch did not step
    for name in before:
        torch.testing.assert_close(rec.weights[2][name], rec.weights[1][name], atol=0, rtol=0)
    assert model.gradsim.skipped_steps.item() == 1 and model.gradsim.measured_steps.item() == 5
    # The cosine EMA only saw the finite steps: recompute it by hand from the logged cosines.
    finite = [cos[0] for cos, _, skipped in model.gate_log if not skipped]
    ema = finite[0]
    for c in finite[1:]:
        ema = 0.5 * ema + 0.5 * c
    assert model.gradsim.cosine_state.item() == pytest.approx(ema, abs=1e-6)
    # And the run is the fp32 run without batch 2, up to float16 rounding of the activations
    # (measured: 1.5e-4; another rule on the same batches ends 0.17 away).
    ref = fit(TinyNet("unweighted", "sgd", {"cosine_ema": 0.5}), batches[:2] + batches[3:])
    for name, p in params(ref).items():
        torch.testing.assert_close(params(model)[name], p, atol=1e-3, rtol=0, msg=name)


def test_16_mixed_clips_the_unscaled_combined_gradient():
    """Lightning's manual-mode clip_gradients clips scaled gradients under 16-mixed (#18089); the
    mixin clips after unscaling, so the norm seen before the step is the clip value itself."""
    rec = Recorder()
    model = TinyNet("unweighted", "sgd", clip=1e-3)
    fit(model, make_batches(3, 8), plugins=[scaler_plugin(init_scale=2.0**12)], callbacks=[rec])
    assert len(rec.grad_norms) == 3
    for norm in rec.grad_norms:
        assert norm == pytest.approx(1e-3, rel=1e-3)


def test_16_mixed_gradients_are_unscaled():
    """The weights after one SGD step do not depend on the loss scale (it is undone exactly)."""
    batches = make_batches(2, 8)
    small = fit(TinyNet("weighted", "sgd"), batches, plugins=[scaler_plugin(init_scale=2.0**4)])
    large = fit(TinyNet("weighted", "sgd"), batches, plugins=[scaler_plugin(init_scale=2.0**14)])
    fp32 = fit(TinyNet("weighted", "sgd"), batches)
    for name, p in params(fp32).items():  # measured: 5.5e-5 from fp32; another rule ends 0.023 away
        torch.testing.assert_close(params(small)[name], params(large)[name], atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(params(small)[name], p, atol=5e-4, rtol=0, msg=name)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])  # 16-mixed becomes bf16 on CPU
def test_bf16_mixed_trains_like_fp32(precision):
    batches = make_batches(4, 8)
    model = fit(TinyNet("projection", "sgd"), batches, precision=precision)
    assert model.trainer.precision == "bf16-mixed"
    ref = fit(TinyNet("projection", "sgd"), batches)
    assert model.global_step == 4 and model.gradsim.measured_steps.item() == 4
    for name, p in params(ref).items():  # measured: 1.1e-3 from fp32; another rule ends 0.038 away
        torch.testing.assert_close(params(model)[name], p, atol=5e-3, rtol=0, msg=name)
    assert any(not torch.equal(params(model)[n], p) for n, p in params(ref).items())  # bf16 did run


def test_16_mixed_uncertainty_weighting_trains_like_fp32():
    """The regulariser's gradient (+1 per log-variance) is added once, unscaled: 20 SGD steps under a
    GradScaler at 2^10 end 1.2e-3 from the fp32 log-variances (7.4 when it went through the scale)."""
    batches = make_batches(20, 8)
    amp = fit(TinyNet(method="uncertainty", optimizer="sgd"), batches, plugins=[scaler_plugin(init_scale=2.0**10)])
    ref = fit(TinyNet(method="uncertainty", optimizer="sgd"), batches)
    s_amp, s_ref = amp.gradsim.loss_weighting.log_vars.detach(), ref.gradsim.loss_weighting.log_vars.detach()
    assert s_ref.abs().min() > 0.1  # the log-variances moved
    torch.testing.assert_close(s_amp, s_ref, atol=5e-3, rtol=0)
