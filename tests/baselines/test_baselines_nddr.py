"""NDDR-CNN units and nets (Gao et al., 2019): against hand-written formulas and the autograd graph."""

import pytest
import torch
from torch import nn

from lightning_gradsim.baselines import CrossStitchMultiHeadNet, NDDRNet, NDDRUnit, nddr_mlp, nddr_resnet
from lightning_gradsim.core.graph import reachable_parameters


def test_diagonal_initialisation_own_column_0_9_other_0_1():
    unit = NDDRUnit(num_channels=4)
    eye = torch.eye(4)
    assert torch.equal(unit.weight_a.detach()[:, :, 0, 0], torch.cat([0.9 * eye, 0.1 * eye], 1))
    assert torch.equal(unit.weight_b.detach()[:, :, 0, 0], torch.cat([0.1 * eye, 0.9 * eye], 1))
    custom = NDDRUnit(num_channels=2, same_weight=0.7, other_weight=0.2)
    assert torch.equal(custom.weight_b.detach()[:, :, 0, 0], torch.tensor([[0.2, 0, 0.7, 0], [0, 0.2, 0, 0.7]]))


def test_forward_is_concat_1x1_conv_batchnorm_relu_by_hand():
    g = torch.Generator().manual_seed(0)
    unit = NDDRUnit(num_channels=3)
    with torch.no_grad():  # a generic mixing, and a BatchNorm affine that is not the identity
        unit.weight_a.copy_(torch.randn(3, 6, 1, 1, generator=g))
        unit.weight_b.copy_(torch.randn(3, 6, 1, 1, generator=g))
        unit.bn_a.weight.copy_(torch.rand(3, generator=g) + 0.5)
        unit.bn_b.bias.copy_(torch.randn(3, generator=g))
    x_a, x_b = torch.randn(5, 3, 4, 2, generator=g), torch.randn(5, 3, 4, 2, generator=g)
    y_a, y_b = unit(x_a, x_b)
    cat = torch.cat([x_a, x_b], 1)
    for y, w, bn in ((y_a, unit.weight_a, unit.bn_a), (y_b, unit.weight_b, unit.bn_b)):
        z = torch.einsum("oc,bchw->bohw", w.detach()[:, :, 0, 0], cat)
        mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
        ref = (z - mean) / torch.sqrt(var + 1e-5) * bn.weight.detach().view(1, 3, 1, 1) + bn.bias.detach().view(
            1, 3, 1, 1
        )
        torch.testing.assert_close(y, ref.clamp(min=0))


def test_each_task_starts_mostly_from_its_own_column():
    unit = NDDRUnit(num_channels=3).eval()  # fresh running statistics: mean 0, var 1
    x_a, x_b = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    y_a, y_b = unit(x_a, x_b)
    scale = (1 + 1e-5) ** -0.5
    torch.testing.assert_close(y_a, (0.9 * x_a + 0.1 * x_b) * scale)
    torch.testing.assert_close(y_b, (0.1 * x_a + 0.9 * x_b) * scale)


def test_flat_features_are_1x1_maps_and_errors():
    unit = NDDRUnit(num_channels=3)
    x_a, x_b = torch.randn(6, 3), torch.randn(6, 3)
    y_a, _ = unit(x_a, x_b)
    y_a4, _ = unit(x_a[:, :, None, None], x_b[:, :, None, None])
    torch.testing.assert_close(y_a, y_a4.flatten(1))
    with pytest.raises(ValueError, match="same shape"):
        unit(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_channels=3"):
        unit(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="positive channel count"):
        NDDRUnit(num_channels=0)
    with pytest.raises(ValueError, match="channel count"):
        NDDRNet([nn.Identity()], [nn.Identity()], [0], [None])  # type: ignore[list-item]


@pytest.mark.parametrize("stitch_after", [[0], [0, 1], [1]])
def test_shared_parameters_are_exactly_those_both_tasks_reach(stitch_after):
    net = nddr_mlp(6, hidden=(5, 4, 3), stitch_after=stitch_after)
    assert all(isinstance(u, NDDRUnit) for u in net.units.values())
    out_a, out_b = net(torch.randn(4, 6))
    reach_a = {id(p) for p in reachable_parameters([out_a.sum()])}
    reach_b = {id(p) for p in reachable_parameters([out_b.sum()])}
    assert {id(p) for p in net.shared_parameters()} == reach_a & reach_b
    assert {id(p) for p in net.task_parameters("a")} == reach_a - reach_b
    assert {id(p) for p in net.stitch_parameters()} == {id(p) for u in net.units.values() for p in u.parameters()}


@pytest.mark.parametrize("method", ["unweighted", "sum", "pcgrad"])
def test_a_gated_nddr_net_trains(method):
    from lightning_gradsim.methods import make_gate

    torch.manual_seed(0)
    model = CrossStitchMultiHeadNet(nddr_mlp(8, hidden=(6, 6)), 6, {"main": 3, "aux": 3})
    gate = make_gate(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    w0 = model.net.units["0"].weight_a.detach().clone()
    first = None
    for _ in range(15):
        opt.zero_grad()
        main = nn.functional.cross_entropy(model(x, "main"), y)
        aux = nn.functional.cross_entropy(model(x, "aux"), (y + 1) % 3)
        first = float(main.detach()) if first is None else first
        gate.backward(main, {"aux": aux}, model.shared_parameters())
        opt.step()
    assert not torch.equal(model.net.units["0"].weight_a.detach(), w0)
    assert float(main.detach()) < first


@pytest.mark.slow
def test_resnet_columns():
    net = nddr_resnet("resnet18", stitch_after=("layer1", "layer2"), in_chans=1, small_input=True)
    assert [u.num_channels for u in net.units.values()] == [64, 128]
    out_a, out_b = net(torch.randn(2, 1, 16, 16))
    assert out_a.shape == out_b.shape == (2, 512)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_compare_setups_build_nddr_classifiers():
    from lightning_gradsim.experiments.registry import build_setup, list_setups

    assert {"rotated_digits_nddr", "class_pair_nddr"} <= set(list_setups())
    module, data = build_setup("rotated_digits_nddr", method="unweighted", seed=0, angle=90, max_images=200)
    units = list(module.net.net.units.values())
    assert len(units) == 3 and all(isinstance(u, NDDRUnit) for u in units)
    assert units[0].same_weight == 0.9 and units[0].other_weight == pytest.approx(0.1)
    ids = {id(p) for p in module.shared_parameters()}
    assert all(id(p) in ids for u in units[:-1] for p in u.parameters())
    assert not any(id(p) in ids for p in units[-1].parameters())  # each of its parts reaches one task
    with pytest.raises(ValueError, match="unit must be one of"):
        build_setup("rotated_digits_cross_stitch", method="sum", seed=0, unit="nope", max_images=200)
