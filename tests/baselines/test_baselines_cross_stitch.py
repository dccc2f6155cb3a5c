"""Cross-stitch units and networks: forward and alpha-gradients against the unit's formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradsim.baselines import (
    CrossStitchMultiHeadNet,
    CrossStitchUnit,
    cross_stitch_mlp,
    cross_stitch_resnet,
)
from lightning_gradsim.core.graph import reachable_parameters

torch.set_num_threads(1)


def test_init_same_plus_other_is_one():
    unit = CrossStitchUnit(same_weight=0.9)
    torch.testing.assert_close(unit.alpha.detach(), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    per_channel = CrossStitchUnit(num_channels=3, same_weight=0.7)
    assert per_channel.alpha.shape == (3, 2, 2)
    torch.testing.assert_close(per_channel.alpha.detach().sum(-1), torch.ones(3, 2))


def test_scalar_unit_forward_and_alpha_gradient():
    unit = CrossStitchUnit()
    with torch.no_grad():
        unit.alpha.copy_(torch.tensor([[0.8, -0.3], [0.25, 1.5]]))
    x_a, x_b = torch.randn(4, 5), torch.randn(4, 5)
    c_a, c_b = torch.randn(4, 5), torch.randn(4, 5)
    y_a, y_b = unit(x_a, x_b)
    torch.testing.assert_close(y_a, 0.8 * x_a - 0.3 * x_b)
    torch.testing.assert_close(y_b, 0.25 * x_a + 1.5 * x_b)
    # L = <c_a, y_a> + <c_b, y_b>  =>  dL/dalpha[t, s] = <c_t, x_s>
    ((c_a * y_a).sum() + (c_b * y_b).sum()).backward()
    xs, cs = (x_a, x_b), (c_a, c_b)
    expected = torch.tensor([[(cs[t] * xs[s]).sum().item() for s in range(2)] for t in range(2)])
    torch.testing.assert_close(unit.alpha.grad, expected)


def test_per_channel_unit_forward_and_alpha_gradient():
    unit = CrossStitchUnit(num_channels=3)
    alpha = torch.randn(3, 2, 2)
    with torch.no_grad():
        unit.alpha.copy_(alpha)
    x_a, x_b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    c_a, c_b = torch.randn_like(x_a), torch.randn_like(x_a)
    y_a, y_b = unit(x_a, x_b)
    for ch in range(3):
        torch.testing.assert_close(y_a[:, ch], alpha[ch, 0, 0] * x_a[:, ch] + alpha[ch, 0, 1] * x_b[:, ch])
        torch.testing.assert_close(y_b[:, ch], alpha[ch, 1, 0] * x_a[:, ch] + alpha[ch, 1, 1] * x_b[:, ch])
    ((c_a * y_a).sum() + (c_b * y_b).sum()).backward()
    xs, cs = (x_a, x_b), (c_a, c_b)
    for ch in range(3):
        for t in range(2):
            for s in range(2):
                expected = (cs[t][:, ch] * xs[s][:, ch]).sum()
                torch.testing.assert_close(unit.alpha.grad[ch, t, s], expected, rtol=1e-5, atol=1e-5)


def test_unit_errors():
    with pytest.raises(ValueError, match="same shape"):
        CrossStitchUnit()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_channels=4"):
        CrossStitchUnit(num_channels=4)(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same_weight"):
        CrossStitchUnit(same_weight=1.5)
    with pytest.raises(ValueError, match="outside"):
        cross_stitch_mlp(8, hidden=(4, 4), stitch_after=[2])


def test_net_forward_equals_manual_columns():
    torch.manual_seed(0)
    net = cross_stitch_mlp(6, hidden=(5, 4), stitch_after=[0])
    with torch.no_grad():
        net.units["0"].alpha.copy_(torch.rand(5, 2, 2))
    x = torch.randn(3, 6)
    h_a, h_b = net.column_a[0](x), net.column_b[0](x)
    al = net.units["0"].alpha
    m_a = al[:, 0, 0] * h_a + al[:, 0, 1] * h_b
    m_b = al[:, 1, 0] * h_a + al[:, 1, 1] * h_b
    out_a, out_b = net(x)
    torch.testing.assert_close(out_a, net.column_a[1](m_a))
    torch.testing.assert_close(out_b, net.column_b[1](m_b))


@pytest.mark.parametrize("stitch_after", [[0], [0, 1], [1]])
def test_shared_parameters_are_exactly_those_both_tasks_reach(stitch_after):
    net = cross_stitch_mlp(6, hidden=(5, 4, 3), stitch_after=stitch_after)
    out_a, out_b = net(torch.randn(2, 6))
    reach_a = {id(p) for p in reachable_parameters([out_a.sum()])}
    reach_b = {id(p) for p in reachable_parameters([out_b.sum()])}
    assert {id(p) for p in net.shared_parameters()} == reach_a & reach_b
    assert {id(p) for p in net.task_parameters("a")} == reach_a - reach_b


@pytest.mark.parametrize(
    "method", ["unweighted", "weighted", "projection", "sum", "main_only", "pcgrad", "uncertainty", "gradnorm"]
)
def test_every_method_trains_a_cross_stitch_net(method):
    from lightning_gradsim.methods import make_gate

    torch.manual_seed(0)
    model = CrossStitchMultiHeadNet(cross_stitch_mlp(8, hidden=(6, 6)), 6, {"main": 3, "aux": 3})
    gate = make_gate(method)
    params = list(model.parameters()) + list(gate.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    alpha0 = model.net.units["0"].alpha.detach().clone()
    first = None
    for _ in range(15):
        opt.zero_grad()
        main = nn.functional.cross_entropy(model(x, "main"), y)
        aux = nn.functional.cross_entropy(model(x, "aux"), (y + 1) % 3)
        first = float(main.detach()) if first is None else first
        gate.backward(
            main,
            {"aux": aux},
            model.shared_parameters(),
            other_params=[p for p in params if all(p is not q for q in model.shared_parameters())],
        )
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert not torch.equal(model.net.units["0"].alpha.detach(), alpha0)
    assert float(main.detach()) < first


@pytest.mark.slow
def test_resnet_columns():
    torch.manual_seed(0)
    net = cross_stitch_resnet("resnet18", stitch_after=("layer1", "layer2"), in_chans=1, small_input=True)
    assert [u.num_channels for u in net.units.values()] == [64, 128]
    out_a, out_b = net(torch.randn(2, 1, 16, 16))
    assert out_a.shape == out_b.shape == (2, 512)
    with pytest.raises(ValueError, match="Unknown ResNet stage"):
        cross_stitch_resnet(stitch_after=("layer9",))
    # shared = units + stem..layer2 of both columns
    n_shared = sum(p.numel() for p in net.shared_parameters())
    expected = sum(p.numel() for col in (net.column_a, net.column_b) for s in list(col)[:3] for p in s.parameters())
    assert n_shared == expected + (64 + 128) * 4


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_cross_stitch_classifier_fits_with_a_loss_weighting():
    import lightning as L

    from lightning_gradsim.experiments import CrossStitchClassifier
    from lightning_gradsim.experiments.compare import list_setups

    assert "rotated_digits_cross_stitch" in list_setups()
    torch.manual_seed(0)
    model = CrossStitchClassifier(
        tasks={"main": 3, "aux": 3}, input_dim=6, hidden=5, depth=2, method="uncertainty", stitch_lr=0.5
    )
    groups = model.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.net.net.stitch_parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    batch = {"main": (x, y), "aux": (x.flip(1), (y + 1) % 3)}
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None)
    alpha0 = model.net.net.units["0"].alpha.detach().clone()
    L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(model, loader)
    assert not torch.equal(model.net.net.units["0"].alpha.detach(), alpha0)
    assert model.gradsim.loss_weighting.log_vars.grad is not None
