"""Uncertainty weighting and GradNorm: closed-form gradients, a hand-computed GradNorm update, the monitor."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradsim import GradientGate, GradSimMixin, GradSimMonitor
from lightning_gradsim.baselines import GradNorm, UncertaintyWeighting
from lightning_gradsim.methods import list_methods, make_gate

torch.set_num_threads(1)


def uncertainty(**kwargs):
    """The plain method: a sum gate composed with the weighting (what make_gate("uncertainty") builds)."""
    return GradientGate(rule="sum", loss_weighting=UncertaintyWeighting(**kwargs))


def gradnorm(**kwargs):
    return GradientGate(rule="sum", loss_weighting=GradNorm(**kwargs))


def test_registered_methods():
    assert {"uncertainty", "gradnorm"} <= set(list_methods())
    assert isinstance(make_gate("uncertainty", aux_tasks=2).loss_weighting, UncertaintyWeighting)
    assert isinstance(make_gate("gradnorm", alpha=0.5).loss_weighting, GradNorm)


# ---------------------------------------------------------------- uncertainty weighting
def _two_task_model():
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4)
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    x = torch.randn(6, 3)
    ys = [torch.randn(6, 1), torch.randn(6, 1)]

    def losses():
        h = torch.tanh(trunk(x))
        return [((head(h) - y) ** 2).mean() for head, y in zip(heads, ys)]

    return trunk, heads, losses


def test_uncertainty_gradients_match_closed_form():
    trunk, heads, losses = _two_task_model()
    gate = uncertainty(aux_tasks=["aux"], aux_weight=0.5)
    with torch.no_grad():
        gate.loss_weighting.log_vars.copy_(torch.tensor([0.3, -0.7]))
    s = torch.tensor([0.3, -0.7])
    lam = torch.tensor([1.0, 0.5])
    l_main, l_aux = losses()
    raw = torch.stack([l_main.detach(), l_aux.detach()])
    # Independent truth: the weighted total loss through plain autograd, with s as constants.
    params = list(trunk.parameters()) + list(heads.parameters())
    total = sum(math.exp(-float(s[i])) * float(lam[i]) * loss for i, loss in enumerate(losses()))
    expected = torch.autograd.grad(total, params)

    stats = gate.backward(l_main, {"aux": l_aux}, trunk.parameters(), other_params=list(heads.parameters()))
    # d/ds_i [exp(-s_i) lambda_i L_i + s_i] = 1 - exp(-s_i) lambda_i L_i
    torch.testing.assert_close(gate.loss_weighting.log_vars.grad, 1 - torch.exp(-s) * lam * raw)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(stats.weight, torch.tensor([math.exp(0.7) * 0.5]))
    metrics = gate.extra_metrics()
    assert set(metrics) == {"log_var/main", "log_var/aux", "task_weight/main", "task_weight/aux"}
    torch.testing.assert_close(metrics["task_weight/main"], torch.tensor(math.exp(-0.3)))


def test_uncertainty_finds_log_vars_without_other_params():
    trunk, heads, losses = _two_task_model()
    gate = uncertainty()
    l_main, l_aux = losses()
    raw = torch.stack([l_main.detach(), l_aux.detach()])
    gate.backward(l_main, [l_aux], trunk.parameters())
    torch.testing.assert_close(gate.loss_weighting.log_vars.grad, 1 - raw)  # s = 0
    assert all(p.grad is not None for p in heads.parameters())


def test_uncertainty_optimum_is_log_of_loss():
    # With a fixed loss L, s* = argmin exp(-s) L + s = log L: gradient descent on s gets there.
    gate = uncertainty()
    w = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    for _ in range(60):  # the error contracts by |1 - lr * exp(-s*) L| = 0.5 per step near s*
        opt.zero_grad()
        w.grad = None
        # losses with values 3 and 0.5 that depend on w (value w / w.detach() = 1)
        gate.backward(3.0 * w.sum() / w.sum().detach(), [0.5 * w.sum() / w.sum().detach()], [w])
        opt.step()
    torch.testing.assert_close(
        gate.loss_weighting.log_vars.detach(), torch.log(torch.tensor([3.0, 0.5])), rtol=1e-3, atol=1e-3
    )


def test_uncertainty_task_count_errors():
    trunk, _, losses = _two_task_model()
    gate = uncertainty(aux_tasks=2)
    l_main, l_aux = losses()
    with pytest.raises(ValueError, match="aux_tasks=1"):
        gate.backward(l_main, [l_aux], trunk.parameters())
    with pytest.raises(ValueError, match="aux_tasks"):
        uncertainty(aux_tasks=0)
    with pytest.raises(TypeError, match="string"):
        uncertainty(aux_tasks="rotated")
    named = uncertainty(aux_tasks=["rotated"])
    with pytest.raises(ValueError, match="rotated"):
        named.backward(*losses()[:1], {"other": losses()[1]}, trunk.parameters())
    with pytest.raises(NotImplementedError, match="backward"):
        named.combine(torch.ones(2), [torch.ones(2)])


def test_combine_with_weights_applied_is_the_rule_on_the_given_vectors():
    """A gate with a loss weighting combines vectors the caller has already scaled, as the same rule
    without a weighting does, and leaves the weighting alone (the caller tells it what it saw)."""
    weighted = make_gate("dwa", rule="weighted", period=2)
    plain = GradientGate(rule="weighted")
    before = {k: v.clone() for k, v in weighted.loss_weighting.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        main, aux = torch.randn(5, generator=g), torch.randn(5, generator=g)
        got, stats = weighted.combine(main, {"aux": aux}, weights_applied=True)
        want, want_stats = plain.combine(main, {"aux": aux})
        assert torch.equal(got, want) and torch.equal(stats.weight, want_stats.weight)
    after = weighted.loss_weighting.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Net(GradSimMixin, L.LightningModule):
    def __init__(self, gate):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.main_head, self.aux_head = nn.Linear(8, 3), nn.Linear(8, 3)
        self.gradsim = gate

    def shared_parameters(self):
        return self.trunk.parameters()

    def task_losses(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        return {"main": F.cross_entropy(self.main_head(h), y), "aux": F.cross_entropy(self.aux_head(h), (y + 1) % 3)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(gate, steps=3):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g))
    model = _Net(gate)
    monitor = GradSimMonitor()
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        accelerator="cpu",
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return model, monitor


def test_uncertainty_with_mixin_trains_log_vars_and_is_monitored():
    gate = uncertainty(aux_tasks=["aux"])
    model, monitor = _fit(gate)
    opt_params = {id(p) for group in model.optimizers().optimizer.param_groups for p in group["params"]}
    assert id(gate.loss_weighting.log_vars) in opt_params
    assert torch.all(gate.loss_weighting.log_vars.detach() != 0)  # the user's optimizer moved them
    for key in ("gradsim/log_var/main", "gradsim/log_var/aux", "gradsim/task_weight/aux", "gradsim/cos/aux"):
        assert len(monitor.history[key]) == 3
    s = gate.loss_weighting.log_vars.detach()
    assert monitor.history["gradsim/log_var/aux"][-1] == pytest.approx(float(s[1]))
    assert monitor.history["gradsim/task_weight/main"][-1] == pytest.approx(math.exp(-float(s[0])))


# ---------------------------------------------------------------- GradNorm
def test_gradnorm_two_updates_by_hand():
    # Shared layer W (1x2), L_i = 0.5 (W x_i)^2 with x_1 = (1, 0), x_2 = (0, 2); alpha = 1.5, lr = 0.1.
    W = nn.Parameter(torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    x1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x2 = torch.tensor([0.0, 2.0], dtype=torch.float64)
    gate = gradnorm(alpha=1.5, lr=0.1)

    def step():
        W.grad = None
        l1, l2 = 0.5 * (W @ x1) ** 2, 0.5 * (W @ x2) ** 2
        gate.backward(l1.sum(), [l2.sum()], [W])
        return W.grad.clone()

    # Step 1, W = (2, 1): L = (2, 2), grad L1 = (2, 0), grad L2 = (0, 4); w = (1, 1).
    # Combined gradient 1*(2,0) + 1*(0,4). L(0) = L so r = (1, 1); G = (2, 4), G_bar = 3, target (3, 3).
    # dL_grad/dw = sign(G - target) * |grad L_i| = (-2, +4); w = (1.2, 0.6) -> * 2/1.8 = (4/3, 2/3).
    torch.testing.assert_close(step(), torch.tensor([[2.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(gate.loss_weighting.task_weights, torch.tensor([4 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(gate.loss_weighting.initial_losses, torch.tensor([2.0, 2.0], dtype=torch.float64))
    # Step 2, W = (1, 1): L = (0.5, 2), grad L1 = (1, 0), grad L2 = (0, 4).
    # Combined gradient (4/3)(1,0) + (2/3)(0,4) = (4/3, 8/3).
    # L/L(0) = (0.25, 1), mean 0.625, r = (0.4, 1.6), r^1.5 = (0.252982, 2.023858).
    # G = (4/3, 8/3), G_bar = 2, target = (0.505964, 4.047715); sign(G - target) = (+1, -1).
    # dL_grad/dw = (+1, -4); w = (4/3 - 0.1, 2/3 + 0.4) = (1.233333, 1.066667), sum 2.3 -> * 2/2.3.
    with torch.no_grad():
        W.copy_(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(step(), torch.tensor([[4 / 3, 8 / 3]], dtype=torch.float64))
    expected = torch.tensor([1.2333333333, 1.0666666667], dtype=torch.float64) * (2 / 2.3)
    torch.testing.assert_close(gate.loss_weighting.task_weights, expected)
    assert float(gate.loss_weighting.task_weights.sum()) == pytest.approx(2.0)
    assert int(gate.loss_weighting.weight_updates) == 2
    assert set(gate.extra_metrics()) == {"task_weight/main", "task_weight/aux0"}


def test_gradnorm_uses_only_the_last_shared_layer():
    # Norms are measured on the last shared layer only (the default picks trunk[1]'s weight and bias).
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    l1, l2 = trunk(x)[:, 0].pow(2).mean(), trunk(x)[:, 1].pow(2).mean()
    last = list(trunk[1].parameters())
    gl = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, last, retain_graph=True)]).norm()
        for loss in (l1, l2)
    ]
    explicit = gradnorm(alpha=1.5, lr=0.05, last_shared_layer=trunk[1].parameters())
    default = gradnorm(alpha=1.5, lr=0.05)
    explicit.backward(l1, [l2], trunk.parameters())
    default.backward(trunk(x)[:, 0].pow(2).mean(), [trunk(x)[:, 1].pow(2).mean()], trunk.parameters())
    # First step: r = 1, target = mean(G); weights (1, 1) -> 1 -/+ lr * |g_i| then renormalised.
    sign = torch.sign(torch.stack(gl) - torch.stack(gl).mean())
    w = 1 - 0.05 * sign * torch.stack(gl)
    torch.testing.assert_close(explicit.loss_weighting.task_weights, 2 * w / w.sum())
    torch.testing.assert_close(default.loss_weighting.task_weights, explicit.loss_weighting.task_weights)
    with pytest.raises(ValueError, match="not among the shared"):
        gradnorm(last_shared_layer=[nn.Parameter(torch.ones(2, 2))]).backward(
            l1.detach() + trunk(x).sum(), [trunk(x).mean()], trunk.parameters()
        )


def test_gradnorm_state_dict_roundtrip_and_monitor():
    gate = gradnorm(lr=0.1)
    model, monitor = _fit(gate, steps=3)
    assert len(monitor.history["gradsim/task_weight/main"]) == 3
    assert monitor.history["gradsim/task_weight/main"][-1] + monitor.history["gradsim/task_weight/aux"][
        -1
    ] == pytest.approx(2.0)
    fresh = gradnorm()
    fresh.load_state_dict(gate.state_dict())
    torch.testing.assert_close(fresh.loss_weighting.task_weights, gate.loss_weighting.task_weights)
    torch.testing.assert_close(fresh.loss_weighting.initial_losses, gate.loss_weighting.initial_losses)
    assert int(fresh.loss_weighting.weight_updates) == 3


def test_gradnorm_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        gradnorm(lr=0.0)
    with pytest.raises(ValueError, match="empty"):
        gradnorm(last_shared_layer=[])


def test_factories_ignore_cosine_gate_options_with_a_warning():
    with pytest.warns(UserWarning, match="threshold"):
        gate = make_gate("uncertainty", threshold=0.1, aux_weight=0.5)
    assert gate.loss_weighting.aux_weight == 0.5
    with pytest.warns(UserWarning, match="cosine_ema"):
        make_gate("gradnorm", cosine_ema=0.9)
    with pytest.raises(TypeError):
        make_gate("gradnorm", not_an_option=1)


def test_gradnorm_uses_the_norm_of_the_prior_weighted_gradient():
    """With aux_weight (lambda) != 1 the update is sign(G_i - target) * |grad_W lambda_i L_i|, as documented."""
    W = nn.Parameter(torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    x1, x2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 4.0], dtype=torch.float64)
    gate = gradnorm(alpha=1.5, lr=0.01, aux_weight=0.5)
    gate.backward((0.5 * (W @ x1) ** 2).sum(), [(0.5 * (W @ x2) ** 2).sum()], [W])
    # grad L1 = (2, 0), grad L2 = (0, 16); lambda = (1, 0.5): G = (2, 8), G_bar = 5, r = 1, target (5, 5).
    # d L_grad / d w = (-1, +1) * (|grad L1|, |grad 0.5 L2|) = (-2, +8); w = (1.02, 0.92) * 2 / 1.94.
    torch.testing.assert_close(W.grad, torch.tensor([[2.0, 8.0]], dtype=torch.float64))
    expected = torch.tensor([1.02, 0.92], dtype=torch.float64) * (2 / 1.94)
    torch.testing.assert_close(gate.loss_weighting.task_weights, expected)


def test_gradnorm_refuses_options_without_the_parameter_gramian_at_construction():
    for kwargs in (dict(similarity="features"), dict(every_n_steps=2)):
        with pytest.raises(
            ValueError, match="reads the per-layer Gramian.*similarity='parameters' and every_n_steps=1"
        ):
            GradientGate(rule="sum", loss_weighting=GradNorm(), **kwargs)
        with pytest.raises(ValueError, match="per-layer Gramian"):
            make_gate("gradnorm", **kwargs)


def test_a_loss_weighting_composes_with_a_cosine_rule():
    """Uncertainty weighting under the unweighted gate: the weighted auxiliary gradient is used only
    while it agrees with the main one; heads and log-variances get the gradients of the weighted losses."""
    w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    head = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    gate = GradientGate(rule="unweighted", loss_weighting=UncertaintyWeighting(aux_tasks=["aux"], aux_weight=0.5))
    with torch.no_grad():
        gate.loss_weighting.log_vars.copy_(torch.tensor([0.0, -1.0]))
    main = (w * w).sum()  # grad (2, 0), L = 1
    aux = (head * (w[0] - 3.0)).sum() ** 2  # L = 16; grad on w (-16, 0): conflicts; on the head 16
    stats = gate.backward(main, {"aux": aux}, [w], other_params=[head])
    assert stats.gate_open.tolist() == [False] and stats.weight.item() == 0.0
    torch.testing.assert_close(w.grad, torch.tensor([2.0, 0.0], dtype=torch.float64))  # the main gradient alone
    scale = math.exp(1.0) * 0.5  # exp(-s_aux) * lambda
    torch.testing.assert_close(head.grad, torch.tensor([scale * 16.0], dtype=torch.float64))
    torch.testing.assert_close(gate.loss_weighting.log_vars.grad, torch.tensor([1 - 1.0, 1 - scale * 16.0]))
