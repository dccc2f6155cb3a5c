"""Several optimizers (backbone / heads) and param groups with different learning rates: the mixin
gives each optimizer the gate's combined gradient and steps each once per step, exactly like a
hand-written PyTorch loop around ``gate.backward``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_gradsim import GradientGate

from ..scale_utils import TinyNet, fit, make_batches, params


def _split_optimizers(model, mode):
    heads = list(model.main_head.parameters()) + list(model.aux_head.parameters())
    trunk = list(model.trunk.parameters())
    if mode == "two_optimizers":
        return [torch.optim.SGD(trunk, lr=0.2, momentum=0.9), torch.optim.Adam(heads, lr=0.01)]
    return [torch.optim.Adam([{"params": trunk, "lr": 0.03}, {"params": heads, "lr": 0.003}])]


class SplitNet(TinyNet):
    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def configure_optimizers(self):
        return _split_optimizers(self, self.mode)


@pytest.mark.parametrize("mode", ["two_optimizers", "param_groups"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_several_optimizers_match_a_hand_written_loop(mode, clip):
    batches = make_batches(6, 8)
    model = fit(SplitNet(mode, rule="projection", clip=clip), batches)

    ref = SplitNet(mode, rule="projection")  # same seed, same init
    gate = GradientGate(rule="projection")
    opts = _split_optimizers(ref, mode)
    for x, y, y_aux in batches:
        for opt in opts:
            opt.zero_grad()
        h = ref.trunk(x)
        gate.backward(
            F.cross_entropy(ref.main_head(h), y),
            {"aux": F.cross_entropy(ref.aux_head(h), y_aux)},
            ref.trunk.parameters(),
            list(ref.main_head.parameters()) + list(ref.aux_head.parameters()),
        )
        if clip is not None:  # one global norm over every optimizer's parameters
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip)
        for opt in opts:
            opt.step()
    assert model.global_step == 6 * len(opts)  # Lightning counts each optimizer's step
    for name, p in params(ref).items():
        torch.testing.assert_close(params(model)[name], p, atol=1e-6, rtol=1e-5, msg=name)
    # Guard: the learning rates differ per part, so one shared LR would end elsewhere.
    same_lr = fit(TinyNet(rule="projection"), batches)
    assert not torch.allclose(params(same_lr)["trunk.0.weight"], params(model)["trunk.0.weight"], atol=1e-4)
