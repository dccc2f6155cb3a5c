"""Per-task gradients (lightning_gradsim.core.gradients) against plain per-task ``backward``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradsim.core.gradients import TaskGradients, per_task_gradients, task_gradients
from lightning_gradsim.core.graph import inspect_graph

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(5, 8)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 3) for _ in range(3)])

    def shared(self) -> list[nn.Parameter]:
        return list(self.stem.parameters()) + list(self.body.parameters())

    def others(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def losses_for(net: Net, structure: str, num_tasks: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 5, generator=g) for _ in range(num_tasks)]
    if structure == "shared":  # one batch, one forward pass
        h = net.body(net.stem(xs[0]))
        feats = [h] * num_tasks
    elif structure == "separate":  # each task its own batch and forward pass
        feats = [net.body(net.stem(x)) for x in xs]
    elif structure == "mixed":  # the stem runs once on all batches; the body runs per task
        z = net.stem(torch.cat(xs))
        feats = [net.body(c) for c in z.chunk(num_tasks)]
    else:
        raise AssertionError(structure)
    return [(net.heads[k](f) ** 2).mean() * (k + 1) for k, f in enumerate(feats)]


def reference(structure: str, num_tasks: int = 3) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Each task's gradient from its own plain ``backward`` on a fresh model."""
    rows, head_sum = [], None
    for k in range(num_tasks):
        net = Net()
        loss = losses_for(net, structure, num_tasks)[k]
        loss.backward()
        rows.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.shared()])
        hg = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.others()]
        head_sum = hg if head_sum is None else [a + b for a, b in zip(head_sum, hg)]
    return rows, head_sum


@pytest.mark.parametrize("structure,shares", [("shared", True), ("separate", False), ("mixed", True)])
def test_inspect_graph_detects_shared_trunk_work(structure, shares):
    net = Net()
    info = inspect_graph(losses_for(net, structure), net.shared())
    assert info.shares_work is shares
    assert info.reaches_shared == [True, True, True]


def test_inspect_graph_main_not_reaching_shared():
    net = Net()
    main = (net.heads[0](torch.randn(2, 8)) ** 2).mean()
    aux = losses_for(net, "shared")[1]
    info = inspect_graph([main, aux], net.shared())
    assert info.reaches_shared[0] is False and info.shares_work is False


@pytest.mark.parametrize("structure", ["shared", "separate", "mixed"])
@pytest.mark.parametrize("strategy", ["auto", "separate", "batched", "sequential"])
def test_per_task_gradients_match_plain_backward(structure, strategy):
    # "separate" forced on a shared graph is still right (the graph is retained to the last task).
    ref_rows, ref_heads = reference(structure)
    net = Net()
    losses = losses_for(net, structure)
    grads = per_task_gradients(losses, net.shared(), net.others(), strategy=strategy)
    # auto: disjoint graphs -> separate; shared work on the CPU -> sequential (batched on accelerators)
    expected = {"auto": "sequential" if structure != "separate" else "separate"}.get(strategy, strategy)
    assert grads.strategy == expected
    stacked = grads.to_task_gradients(net.shared()).shared
    for i, s in enumerate(stacked):
        for k in range(3):
            torch.testing.assert_close(s[k], ref_rows[k][i], rtol=1e-5, atol=1e-6)
    for g, r in zip(grads.others, ref_heads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert grads.reached[0] is True


def test_rows_layout_is_not_stacked_and_marks_unreached_parameters():
    net = Net()
    extra = nn.Parameter(torch.ones(3))
    losses = losses_for(net, "separate")
    losses[1] = losses[1] + (extra**2).sum()
    grads = per_task_gradients(losses, net.shared() + [extra], net.others(), strategy="auto")
    assert grads.stacked is None and grads.rows is not None
    assert grads.rows[0][-1] is None and grads.rows[2][-1] is None
    torch.testing.assert_close(grads.rows[1][-1], 2 * extra.detach())
    assert grads.present() == list(range(len(net.shared()) + 1))


def test_task_gradients_keeps_its_stacked_contract():
    net = Net()
    unused = nn.Parameter(torch.zeros(2))
    losses = losses_for(net, "separate")
    out = task_gradients(losses, net.shared() + [unused], net.others())
    assert isinstance(out, TaskGradients)
    assert out.shared[-1] is None
    ref_rows, _ = reference("separate")
    for i, p in enumerate(net.shared()):
        assert out.shared[i].shape == (3,) + tuple(p.shape)
        torch.testing.assert_close(out.shared[i][2], ref_rows[2][i], rtol=1e-5, atol=1e-6)
    assert out.reached == [True, True, True]


class NoVmap(torch.autograd.Function):
    """An op whose backward vmap cannot batch (no vmap rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.from_numpy(g.detach().numpy() * 2.0) + 0 * x


def _novmap_losses(net: Net) -> list[torch.Tensor]:
    h = NoVmap.apply(net.body(net.stem(torch.randn(4, 5, generator=torch.Generator().manual_seed(3)))))
    return [(net.heads[k](h) ** 2).mean() * (k + 1) for k in range(2)]


def test_batched_falls_back_to_sequential_when_vmap_fails():
    net = Net()
    state: dict[str, bool] = {}
    with pytest.warns(RuntimeWarning, match="using one backward per task"):
        grads = per_task_gradients(_novmap_losses(net), net.shared(), net.others(), strategy="batched", state=state)
    assert grads.strategy == "sequential" and state.get("failed")
    for k in range(2):
        ref = Net()
        _novmap_losses(ref)[k].backward()
        for g, p in zip(grads.rows[k], ref.shared()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    # remembered: the next call goes sequential directly, without a warning
    again = per_task_gradients(_novmap_losses(net), net.shared(), net.others(), strategy="batched", state=state)
    assert again.strategy == "sequential"


def test_unknown_strategy_is_refused():
    net = Net()
    with pytest.raises(ValueError, match="strategy must be one of"):
        per_task_gradients(losses_for(net, "shared"), net.shared(), net.others(), strategy="fast")
