"""PCGrad rule: hand-computed 2-D/3-D cases and a plain vector-loop reference (Yu et al., Alg. 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradsim import GradientGate
from lightning_gradsim.baselines import PCGrad, draw_pcgrad_orders, pcgrad_coefficients
from lightning_gradsim.methods import list_methods, make_gate
from lightning_gradsim.rules import get_rule

torch.set_num_threads(1)


def reference_pcgrad(vectors: list[torch.Tensor], orders: torch.Tensor) -> torch.Tensor:
    """The paper's algorithm on explicit vectors: project task i off each conflicting *original* g_j."""
    out = torch.zeros_like(vectors[0])
    for i, g_i in enumerate(vectors):
        v = g_i.clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            g_j = vectors[j]
            dot = torch.dot(v, g_j)
            if dot < 0 and torch.dot(g_j, g_j) > 0:
                v = v - dot / torch.dot(g_j, g_j) * g_j
        out = out + v
    return out


def test_registered_as_rule_and_method():
    assert "pcgrad" in list_methods()
    assert isinstance(get_rule("pcgrad"), PCGrad)
    assert PCGrad().keeps_main_descent() is False
    assert make_gate("pcgrad").rule_name == "pcgrad"


def test_two_tasks_by_hand():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1, |g2|^2 = 2, |g1|^2 = 1.
    # g1' = g1 + 1/2 g2 = (0.5, 0.5); g2' = g2 + 1 g1 = (0, 1); sum = (0.5, 1.5).
    gate = GradientGate(rule="pcgrad")
    out, stats = gate.combine(torch.tensor([1.0, 0.0]), [torch.tensor([-1.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))
    assert not bool(stats.gate_open.item())  # the auxiliary gradient was projected
    # The main gradient was projected too: the combination is not g_main + g_aux'.
    assert not torch.allclose(out, torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(stats.weight, torch.tensor([1.5]))  # coefficient on g_aux: 1 + 1/2


def test_no_conflict_is_plain_sum():
    gate = GradientGate(rule="pcgrad", aux_weight=0.5)
    out, stats = gate.combine(torch.tensor([1.0, 2.0]), [torch.tensor([3.0, -1.0])])  # dot = 1 > 0
    torch.testing.assert_close(out, torch.tensor([2.5, 1.5]))
    assert bool(stats.gate_open.item())


def test_three_tasks_by_hand_both_orders():
    # g1 = (1,0,0), g2 = (-1,1,0), g3 = (-1,0,1): g1.g2 = g1.g3 = -1, g2.g3 = 1, |g2|^2 = |g3|^2 = 2.
    # Task 1, order (2, 3): v = g1 + g2/2 = (.5,.5,0); v.g3 = -.5 -> v += g3/4 -> (.25,.5,.25).
    # Task 1, order (3, 2): v = g1 + g3/2 = (.5,0,.5); v.g2 = -.5 -> v += g2/4 -> (.25,.25,.5).
    # Task 2: g2 + g1 = (0,1,0), which no longer conflicts with g3 (either order). Task 3: (0,0,1).
    g = torch.tensor([[1.0, 0, 0], [-1.0, 1, 0], [-1.0, 0, 1]])
    gram = g @ g.T
    orders_23 = torch.tensor([[1, 2, 0], [0, 2, 1], [0, 1, 2]])
    orders_32 = torch.tensor([[2, 0, 1], [2, 0, 1], [1, 0, 2]])
    torch.testing.assert_close(pcgrad_coefficients(gram, orders_23).sum(0) @ g, torch.tensor([0.25, 1.5, 1.25]))
    torch.testing.assert_close(pcgrad_coefficients(gram, orders_32).sum(0) @ g, torch.tensor([0.25, 1.25, 1.5]))
    # Through the gate, the random order gives one of the two, and both occur over seeds.
    seen = set()
    for seed in range(12):
        out, _ = GradientGate(rule="pcgrad", seed=seed).combine(g[0], {"a": g[1], "b": g[2]})
        seen.add(tuple(round(v, 4) for v in out.tolist()))
    assert seen == {(0.25, 1.5, 1.25), (0.25, 1.25, 1.5)}


@pytest.mark.parametrize("aux_weight", [1.0, 0.3])
def test_matches_reference_with_seeded_orders(aux_weight):
    gen = torch.Generator().manual_seed(123)
    k, d, seed = 5, 7, 11
    vecs = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(k)]
    gate = GradientGate(rule="pcgrad", aux_weight=aux_weight, seed=seed)
    rng = torch.Generator().manual_seed(seed)  # the gate draws the orders from its own seeded generator
    for _ in range(3):  # consecutive steps use fresh orders from the same stream
        orders = draw_pcgrad_orders((), k, rng)
        scaled = [vecs[0]] + [aux_weight * v for v in vecs[1:]]
        expected = reference_pcgrad(scaled, orders)
        out, _ = gate.combine(vecs[0], vecs[1:])
        torch.testing.assert_close(out, expected)


def test_batched_problems_each_get_their_own_orders():
    gen = torch.Generator().manual_seed(5)
    b, k, d, seed = 4, 4, 6, 3
    vecs = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    gate = GradientGate(rule="pcgrad", seed=seed)
    out, stats = gate.combine(vecs[:, 0], [vecs[:, i] for i in range(1, k)], batch_dims=1)
    orders = draw_pcgrad_orders((b,), k, torch.Generator().manual_seed(seed))
    for p in range(b):
        torch.testing.assert_close(out[p], reference_pcgrad(list(vecs[p]), orders[p]))
    assert stats.gate_open.shape == (b, k - 1)


def test_gate_open_means_no_conflict():
    g = torch.tensor([[1.0, 0, 0], [0.0, 1, 0], [-1.0, -1, 1]])  # task 3 conflicts with 1 and 2; 2 only with 3
    _, stats = GradientGate(rule="pcgrad").combine(g[0], {"a": g[1], "b": g[2]})
    assert stats.gate_open.tolist() == [False, False]
    _, stats = GradientGate(rule="pcgrad").combine(g[0], {"a": g[1], "b": torch.tensor([1.0, 1.0, 1.0])})
    assert stats.gate_open.tolist() == [True, True]


def test_backward_on_model_matches_reference_and_heads_get_plain_sum():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in range(3)])
    x = torch.randn(8, 4)
    ys = [torch.randn(8, 1) for _ in range(3)]

    def losses():
        h = trunk(x)
        return [((head(h) - y) ** 2).mean() for head, y in zip(heads, ys)]

    shared = list(trunk.parameters())
    per_task = [torch.autograd.grad(losses()[i], shared) for i in range(3)]
    flat = [torch.cat([g.reshape(-1) for g in gs]) for gs in per_task]
    head_grads = [torch.autograd.grad(losses()[i], list(h.parameters())) for i, h in enumerate(heads)]
    orders = draw_pcgrad_orders((), 3, torch.Generator().manual_seed(7))
    expected = reference_pcgrad(flat, orders)

    gate = GradientGate(rule="pcgrad", seed=7)
    main, a, b = losses()
    gate.backward(main, {"a": a, "b": b}, shared, other_params=list(heads.parameters()))
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for h, gs in zip(heads, head_grads):
        for p, g in zip(h.parameters(), gs):
            torch.testing.assert_close(p.grad, g)


def test_generator_state_is_checkpointed():
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    gate = GradientGate(rule="pcgrad", seed=0)
    gate.combine(g[0], list(g[1:]))
    state = gate.state_dict()
    nxt, _ = gate.combine(g[0], list(g[1:]))
    fresh = GradientGate(rule="pcgrad", seed=99)
    fresh.load_state_dict(state)
    again, _ = fresh.combine(g[0], list(g[1:]))
    torch.testing.assert_close(again, nxt)


def test_bad_orders_shape_is_refused():
    with pytest.raises(ValueError, match="orders"):
        pcgrad_coefficients(torch.eye(3), torch.zeros(2, 2, dtype=torch.long))


def test_cpu_fast_path_matches_tensor_path():
    gen = torch.Generator().manual_seed(2)
    for k in (2, 3, 6):
        g = torch.randn(k, 9, generator=gen, dtype=torch.float64)
        gram = g @ g.T
        orders = draw_pcgrad_orders((), k, gen)
        fast = pcgrad_coefficients(gram, orders)  # one CPU problem: Python-float path
        batched = pcgrad_coefficients(gram.unsqueeze(0), orders.unsqueeze(0))[0]  # tensor path
        torch.testing.assert_close(fast, batched)
        torch.testing.assert_close(fast.sum(0) @ g, reference_pcgrad(list(g), orders))


def test_coefficients_under_vmap_match_batched():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64)
    gram = g @ g.transpose(-1, -2)
    orders = draw_pcgrad_orders((5,), 3, gen)
    torch.testing.assert_close(torch.func.vmap(pcgrad_coefficients)(gram, orders), pcgrad_coefficients(gram, orders))


def test_agrees_with_torchjd_pcgrad():
    """torchjd's PCGrad aggregator (an independent implementation), when installed."""
    import itertools

    aggregation = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(8)
    for _ in range(5):  # two tasks: the order does not matter, results must be equal
        g = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        ours, _ = GradientGate(rule="pcgrad").combine(g[0], [g[1]])
        torch.testing.assert_close(ours, aggregation.PCGrad()(g))
    # three tasks: torchjd's random orders give one of ours over all orders
    g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    gram = g @ g.T
    rows = [[list(perm) for perm in itertools.permutations(range(3))] for _ in range(3)]
    candidates = [
        pcgrad_coefficients(gram, torch.tensor([r0, r1, r2])).sum(0) @ g for r0, r1, r2 in itertools.product(*rows)
    ]
    theirs = aggregation.PCGrad()(g)
    assert any(torch.allclose(theirs, c, atol=1e-9) for c in candidates)
