"""The gate's fast paths against independent references.

References are computed without the gate: each task's gradient from its own plain ``backward`` on
a fresh copy of the model, flattened, and combined by the paper's formulas by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gradsim import GradientGate

torch.set_num_threads(1)

LAM = 0.7


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(5, 8)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 2) for _ in range(3)])
        self.to(dtype)

    def shared(self) -> list[nn.Parameter]:
        return list(self.stem.parameters()) + list(self.body.parameters())

    def others(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def batches(step: int, num_tasks: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(4, 5, generator=g).to(dtype) for _ in range(num_tasks)]


def forward(net: Net, structure: str, xs: list[torch.Tensor], gate: GradientGate | None = None) -> list[torch.Tensor]:
    k = len(xs)
    if structure == "shared":
        h = net.body(net.stem(xs[0]))
        if gate is not None and gate.similarity == "features":
            gate.mark_features(h)
        feats = [h] * k
    elif structure == "separate":
        feats = [net.body(net.stem(x)) for x in xs]
    else:  # mixed: stem computed once for all batches, body per task
        z = net.stem(torch.cat(xs))
        feats = [net.body(c) for c in z.chunk(k)]
    # targets make the tasks' gradients disagree for some steps and agree for others
    return [((net.heads[i](f) - (i - 1.0)) ** 2).mean() for i, f in enumerate(feats)]


def task_vectors(net: Net, structure: str, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Flattened per-task shared gradients and the heads' summed gradients, by plain backward."""
    vecs, heads = [], None
    for k in range(len(xs)):
        ref = copy.deepcopy(net)
        ref.zero_grad(set_to_none=True)
        forward(ref, structure, xs)[k].backward()
        vecs.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ref.shared()])
        )
        hg = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ref.others()]
        heads = hg if heads is None else [a + b for a, b in zip(heads, hg)]
    return vecs, heads


def by_hand(rule: str, vecs: list[torch.Tensor]) -> torch.Tensor:
    main = vecs[0]
    out = main.clone()
    for v in vecs[1:]:
        cos = torch.dot(main, v) / (main.norm() * v.norm())
        if rule == "unweighted":
            out += LAM * v * float(cos >= 0)
        elif rule == "weighted":
            out += LAM * max(float(cos), 0.0) * v
        elif rule == "projection":
            u = main / main.norm()
            out += LAM * (v - min(0.0, float(torch.dot(v, u))) * u)
        elif rule == "sum":
            out += LAM * v
        elif rule == "main_only":
            pass
    return out


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("structure", ["shared", "separate", "mixed"])
@pytest.mark.parametrize("rule", ["unweighted", "weighted", "projection", "sum", "main_only"])
def test_backward_matches_hand_combination(structure, rule):
    net = Net()
    gate = GradientGate(rule=rule, aux_weight=LAM)
    saw_closed = saw_open = False
    for step in range(4):
        xs = batches(step, 3)
        vecs, heads = task_vectors(net, structure, xs)
        net.zero_grad(set_to_none=True)
        stats = gate.backward(*_split(forward(net, structure, xs)), net.shared(), net.others())
        torch.testing.assert_close(flat_grad(net.shared()), by_hand(rule, vecs), rtol=1e-5, atol=1e-6)
        for p, h in zip(net.others(), heads):
            torch.testing.assert_close(p.grad, h, rtol=1e-5, atol=1e-6)
        cos = torch.stack([torch.dot(vecs[0], v) / (vecs[0].norm() * v.norm()) for v in vecs[1:]])
        torch.testing.assert_close(stats.cosine, cos, rtol=1e-5, atol=1e-6)
        saw_closed |= bool((cos < 0).any())
        saw_open |= bool((cos >= 0).any())
        with torch.no_grad():  # move the parameters so that the steps differ
            for p in net.parameters():
                p -= 0.3 * p.grad
    assert saw_closed and saw_open  # the data exercise both branches of the gate


def _split(losses: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return losses[0], losses[1:]


@pytest.mark.parametrize("structure", ["shared", "separate"])
def test_projection_with_ema_matches_combine_on_the_same_vectors(structure):
    """Rows path (separate) and stacked path (shared) against combine() with the same state."""
    net = Net()
    gate = GradientGate(rule="projection", aux_weight=LAM, main_grad_ema=0.8, cosine_ema=0.5)
    twin = GradientGate(rule="projection", aux_weight=LAM, main_grad_ema=0.8, cosine_ema=0.5)
    for step in range(3):
        xs = batches(step, 3)
        vecs, _ = task_vectors(net, structure, xs)
        net.zero_grad(set_to_none=True)
        gate.backward(*_split(forward(net, structure, xs)), net.shared(), net.others())
        expected, _ = twin.combine(vecs[0], {"aux0": vecs[1], "aux1": vecs[2]})
        torch.testing.assert_close(flat_grad(net.shared()), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gate.cosine_state, twin.cosine_state)
    # the EMA buffers have the shapes of the parameters
    assert gate.main_grad_ema_0.shape == net.shared()[0].shape


@pytest.mark.parametrize("structure", ["shared", "separate"])
def test_grad_is_accumulated_in_place(structure):
    net = Net()
    gate = GradientGate(rule="sum", aux_weight=LAM)
    xs = batches(0, 2)
    vecs, _ = task_vectors(net, structure, xs)
    for p in net.shared():
        p.grad = torch.ones_like(p)
    before = [p.grad for p in net.shared()]
    gate.backward(*_split(forward(net, structure, xs)), net.shared(), net.others())
    assert all(p.grad is b for p, b in zip(net.shared(), before))  # same tensors, added into
    torch.testing.assert_close(flat_grad(net.shared()), 1 + vecs[0] + LAM * vecs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["separate", "batched", "sequential"])
def test_forced_strategies_agree(strategy):
    net = Net()
    gate = GradientGate(rule="weighted", aux_weight=LAM)
    gate.grad_strategy = strategy
    xs = batches(1, 3)
    vecs, _ = task_vectors(net, "shared", xs)
    gate.backward(*_split(forward(net, "shared", xs)), net.shared(), net.others())
    torch.testing.assert_close(flat_grad(net.shared()), by_hand("weighted", vecs), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ similarity="features"
@pytest.mark.parametrize("rule", ["unweighted", "weighted", "sum"])
def test_features_mode_is_exact_given_the_feature_space_gate(rule):
    net = Net()
    gate = GradientGate(rule=rule, aux_weight=LAM, similarity="features")
    for step in range(4):
        xs = batches(step, 3)
        # reference: the cosine of the feature gradients decides w_k; the trunk then gets
        # sum_k w_k g_k, i.e. the gradient of sum_k w_k L_k; heads get their own gradients.
        ref = copy.deepcopy(net)
        h = ref.body(ref.stem(xs[0]))
        hd = h.detach().requires_grad_()
        ref_losses = [((ref.heads[i](hd) - (i - 1.0)) ** 2).mean() for i in range(3)]
        fg = [torch.autograd.grad(loss, hd)[0].flatten() for loss in ref_losses]
        ws = [1.0]
        for v in fg[1:]:
            cos = float(torch.dot(fg[0], v) / (fg[0].norm() * v.norm()))
            ws.append(LAM * {"unweighted": float(cos >= 0), "weighted": max(cos, 0.0), "sum": 1.0}[rule])
        ref.zero_grad(set_to_none=True)
        losses = forward(ref, "shared", xs)
        trunk_grads = torch.autograd.grad(sum(w * loss for w, loss in zip(ws, losses)), ref.shared(), retain_graph=True)
        head_grads = torch.autograd.grad(sum(losses), ref.others())

        net.zero_grad(set_to_none=True)
        stats = gate.backward(*_split(forward(net, "shared", xs, gate)), net.shared(), net.others())
        for p, g in zip(net.shared(), trunk_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        for p, g in zip(net.others(), head_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.weight, torch.tensor(ws[1:]), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.3 * p.grad


def test_features_mode_explicit_features_argument():
    net = Net()
    gate = GradientGate(rule="sum", aux_weight=LAM, similarity="features")
    xs = batches(0, 2)
    vecs, _ = task_vectors(net, "shared", xs)
    h = net.body(net.stem(xs[0]))
    losses = [((net.heads[i](h) - (i - 1.0)) ** 2).mean() for i in range(2)]
    gate.backward(losses[0], losses[1:], net.shared(), net.others(), features=h)
    torch.testing.assert_close(flat_grad(net.shared()), vecs[0] + LAM * vecs[1], rtol=1e-5, atol=1e-6)


def test_features_mode_errors_are_clear():
    net = Net()
    gate = GradientGate(similarity="features")
    xs = batches(0, 2)
    with pytest.raises(ValueError, match="mark_features"):
        gate.backward(*_split(forward(net, "shared", xs)), net.shared(), net.others())
    # tasks with their own batches do not share the marked features
    h = gate.mark_features(net.body(net.stem(xs[0])))
    main = (net.heads[0](h) ** 2).mean()
    aux = (net.heads[1](net.body(net.stem(xs[1]))) ** 2).mean()
    with pytest.raises(ValueError, match="without going through the marked features"):
        gate.backward(main, [aux], net.shared(), net.others())
    with pytest.raises(ValueError, match="similarity must be"):
        GradientGate(similarity="feature")


# ------------------------------------------------------------------ every_n_steps
@pytest.mark.parametrize("structure", ["shared", "separate"])
def test_every_n_steps_reuses_the_last_measured_weights(structure):
    net, exact_net = Net(), Net()
    gate = GradientGate(rule="unweighted", aux_weight=LAM, every_n_steps=3)
    exact = GradientGate(rule="unweighted", aux_weight=LAM)
    weights = None
    for step in range(7):
        xs = batches(step, 3)
        net.zero_grad(set_to_none=True)
        last_before = gate.last_stats
        stats = gate.backward(*_split(forward(net, structure, xs)), net.shared(), net.others())
        vecs, heads = task_vectors(net, structure, xs)
        if step % 3 == 0:  # measured: identical to the exact gate
            exact_net.load_state_dict(net.state_dict())
            exact_net.zero_grad(set_to_none=True)
            exact.reset_state()
            exact.backward(*_split(forward(exact_net, structure, xs)), exact_net.shared(), exact_net.others())
            torch.testing.assert_close(flat_grad(net.shared()), flat_grad(exact_net.shared()), rtol=1e-5, atol=1e-6)
            weights = [1.0] + stats.weight.tolist()
            assert gate.last_stats is stats
        else:  # reused: sum_k w_k g_k with the last measured w, no new statistics
            expected = sum(w * v for w, v in zip(weights, vecs))
            torch.testing.assert_close(flat_grad(net.shared()), expected, rtol=1e-5, atol=1e-6)
            assert gate.last_stats is last_before
        for p, h in zip(net.others(), heads):
            torch.testing.assert_close(p.grad, h, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.3 * p.grad
    assert gate.step.item() == 7 and gate.measured_steps.item() == 3


def test_every_n_steps_validation_and_repr():
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        GradientGate(every_n_steps=0)
    r = repr(GradientGate(similarity="features", every_n_steps=4))
    assert "similarity='features'" in r and "every_n_steps=4" in r


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("structure", ["shared", "separate"])
def test_half_precision_gradients(dtype, structure):
    net32, net = Net(), Net(dtype)
    gate = GradientGate(rule="unweighted", aux_weight=LAM)
    # step 0: in float32 the cosines are (-0.40, 0.54) shared and (-0.26, 0.31) separate, far from the
    # threshold 0 (a half-precision rounding cannot flip the gate), and one gate closes, so "unweighted"
    # and "sum" give different gradients
    xs = batches(0, 3)
    vecs, _ = task_vectors(net32, structure, xs)
    cos32 = torch.stack([torch.dot(vecs[0], v) / (vecs[0].norm() * v.norm()) for v in vecs[1:]])
    assert float(cos32.abs().min()) > 0.2 and bool((cos32 < 0).any()) and bool((cos32 > 0).any())
    stats = gate.backward(*_split(forward(net, structure, [x.to(dtype) for x in xs])), net.shared(), net.others())
    assert stats.cosine.dtype == torch.float32  # statistics in float32
    assert all(p.grad.dtype == dtype for p in net.shared())
    assert torch.equal(stats.gate_open, cos32 >= 0)  # the same decisions as in float32
    torch.testing.assert_close(stats.cosine, cos32, rtol=0, atol=2 * torch.finfo(dtype).eps)
    # two roundings of the gradients' largest entry (bf16 0.012, fp16 0.0015; measured: bf16 0.0023,
    # fp16 0.00026 at |g| <= 0.78)
    want = by_hand("unweighted", vecs)
    atol = 2 * torch.finfo(dtype).eps * float(want.abs().max())
    got = flat_grad(net.shared()).float()
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert float((got - by_hand("sum", vecs)).abs().max()) > 2 * atol  # the check tells the rules apart


def test_non_finite_aux_loss_leaves_the_main_gradient_finite():
    net = Net()
    gate = GradientGate(rule="unweighted")
    losses = forward(net, "shared", batches(0, 2))
    stats = gate.backward(losses[0], [losses[1] * float("inf")], net.shared(), net.others())
    assert bool(torch.isfinite(stats.main_norm)) and not bool(stats.finite)
    assert gate.measured_steps.item() == 0 and gate.skipped_steps.item() == 1


def test_features_mode_and_every_n_steps_in_the_mixin():
    import lightning as L

    from lightning_gradsim import GradSimMixin

    class Module(GradSimMixin, L.LightningModule):
        def __init__(self, **kw):
            super().__init__()
            self.net = Net()
            self.gradsim = GradientGate(aux_weight=LAM, **kw)

        def shared_parameters(self):
            return self.net.shared()

        def task_losses(self, batch, batch_idx):
            (x,) = batch
            h = self.gradsim.mark_features(self.net.body(self.net.stem(x)))
            return {"main": (self.net.heads[0](h) ** 2).mean(), "aux": ((self.net.heads[1](h) - 1) ** 2).mean()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 5)), batch_size=4)
    for kw, measured in ((dict(similarity="features"), 6), (dict(similarity="features", every_n_steps=4), 2)):
        model = Module(**kw)
        used = model.net.shared() + list(model.net.heads[0].parameters()) + list(model.net.heads[1].parameters())
        before = [p.detach().clone() for p in used]
        L.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model, data)
        assert model.gradsim.step.item() == 6 and model.gradsim.measured_steps.item() == measured
        assert all(not torch.equal(b, p) for b, p in zip(before, used))


def test_a_reused_step_with_an_inf_gradient_is_reported_and_counted():
    """every_n_steps: a reused step (one weighted backward) whose gradient overflows with finite
    losses is not finite in its statistics and counts as skipped."""
    net = Net()
    gate = GradientGate(rule="unweighted", aux_weight=LAM, every_n_steps=3)
    for step in range(3):
        net.zero_grad(set_to_none=True)
        losses = forward(net, "shared", batches(step, 2))
        hook = net.stem.weight.register_hook(lambda g: torch.full_like(g, float("inf"))) if step == 1 else None
        stats = gate.backward(losses[0], losses[1:], net.shared(), net.others())  # step 1 is a reused step
        assert bool(stats.finite) == (step != 1), step
        if hook is not None:
            hook.remove()
    assert gate.skipped_steps.item() == 1 and gate.measured_steps.item() == 1
    assert gate.step.item() == 3
