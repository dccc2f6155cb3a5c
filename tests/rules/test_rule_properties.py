"""Properties every registered rule must have (as torchjd tests its aggregators): run on ALL of them.

Output shape, batch invariance (one batched ``combine`` == a loop of single problems), equivariance
to the order of the auxiliary tasks, and Proposition 1 of the paper (``g . g_main >= |g_main|^2``)
exactly under the gate options for which a rule claims it (``keeps_main_descent(**options)``).
Rules that draw random numbers (PCGrad's visiting orders) are checked on two tasks, where the
order does not matter, and in distribution.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gradsim import GradientGate, RuleInput, get_rule, list_rules

RULES = list_rules()  # the library's rules, at collection time
GEN = torch.Generator().manual_seed(0)


def _vectors(
    num_aux: int, dim: int = 5, batch: tuple[int, ...] = (), seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    main = torch.randn(batch + (dim,), generator=gen, dtype=torch.float64)
    aux = [torch.randn(batch + (dim,), generator=gen, dtype=torch.float64) * (1 + k) for k in range(num_aux)]
    return main, aux


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("num_aux", [1, 3])
def test_output_shapes(rule, num_aux):
    r = get_rule(rule)
    main, aux = _vectors(num_aux, batch=(4,))
    vecs = torch.stack([main] + aux, dim=-2)  # (4, K, D)
    if r.uses_main_direction:
        vecs = torch.cat([vecs, main.unsqueeze(-2)], dim=-2)
    gram = vecs @ vecs.mT
    cos = torch.zeros(4, num_aux, dtype=torch.float64)
    inp = RuleInput(
        gram, cos, cos, torch.full((num_aux,), 0.5, dtype=torch.float64), 0.0, torch.Generator().manual_seed(0)
    )
    weights = r.weights(inp)
    assert weights.shape == (4, num_aux + 1 + int(r.uses_main_direction))
    assert weights.dtype == torch.float64 and torch.isfinite(weights).all()
    gate_open = r.gate_open(inp, weights)
    assert gate_open.shape == (4, num_aux) and gate_open.dtype == torch.bool
    out, stats = GradientGate(rule=rule).combine(main[0], aux and [a[0] for a in aux])
    assert out.shape == main[0].shape
    for field in ("cosine", "smoothed_cosine", "weight", "gate_open", "aux_norm"):
        assert getattr(stats, field).shape == (num_aux,), field
    assert stats.main_norm.shape == () and stats.finite.shape == ()


@pytest.mark.parametrize("rule", RULES)
def test_batched_combine_equals_a_loop_of_single_problems(rule):
    num_aux = 2 if get_rule(rule).deterministic else 1  # one aux: PCGrad's order cannot matter
    kwargs = dict(cosine_ema=0.5, main_grad_ema=0.5 if get_rule(rule).uses_main_direction else 0.0, aux_weight=0.7)
    batched = GradientGate(rule=rule, **kwargs)
    singles = [GradientGate(rule=rule, **kwargs) for _ in range(3)]
    for step in range(3):
        main, aux = _vectors(num_aux, batch=(3,), seed=step)
        params = [main, main[:, :2] * 2]  # two tensors per problem
        aux_params = [[a, a[:, :2] * -1] for a in aux]
        out, stats = batched.combine(params, aux_params, batch_dims=1)
        for i, gate in enumerate(singles):
            o, s = gate.combine([p[i] for p in params], [[t[i] for t in a] for a in aux_params])
            for x, y in zip(out, o):
                torch.testing.assert_close(x[i], y)
            torch.testing.assert_close(stats.weight[i], s.weight)
            assert torch.equal(stats.gate_open[i], s.gate_open)


@pytest.mark.parametrize("rule", RULES)
def test_equivariant_to_the_order_of_the_auxiliary_tasks(rule):
    r = get_rule(rule)
    main, aux = _vectors(3, seed=3)
    lam = {"a": 0.5, "b": 1.0, "c": 2.0}
    perm = ["c", "a", "b"]
    if r.deterministic:
        out, stats = GradientGate(rule=rule, aux_weight=lam).combine(main, dict(zip("abc", aux)))
        out_p, stats_p = GradientGate(rule=rule, aux_weight=lam).combine(main, {n: aux["abc".index(n)] for n in perm})
        torch.testing.assert_close(out, out_p)
        idx = ["abc".index(n) for n in perm]
        torch.testing.assert_close(stats_p.weight, stats.weight[idx])
        assert torch.equal(stats_p.gate_open, stats.gate_open[idx])
        return

    # A random rule: the same set of outcomes over seeds, whatever the order of the tasks.
    def outcomes(order):
        seen = set()
        for seed in range(64):
            out, _ = GradientGate(rule=rule, aux_weight=lam, seed=seed).combine(
                main, {n: aux["abc".index(n)] for n in order}
            )
            seen.add(tuple(round(v, 6) for v in out.tolist()))
        return seen

    assert outcomes("abc") == outcomes(perm)


# Proposition 1 (g . g_main >= |g_main|^2) under each option of the gate, varied one at a time from
# the defaults: where a rule claims it (``keeps_main_descent(**options)``), random problems of a real
# two-layer trunk, three gate steps each, never break it; where it does not, they do (by a clear margin).
OPTION_CASES = [
    {},
    {"threshold": 0.3},
    {"threshold": -0.3},
    {"cosine_ema": 0.5},
    {"main_grad_ema": 0.5},
    {"per_layer": True},
    {"similarity": "features"},
    {"every_n_steps": 2},
]


def _descent_margins(rule: str, options: dict, problems: int) -> list[float]:
    """Per gate step: (g . g_main - |g_main|^2) / (1 + |g_main|^2), g the update the gate wrote."""
    margins = []
    for seed in range(problems):
        gen = torch.Generator().manual_seed(seed)
        scale = torch.rand(2, generator=gen, dtype=torch.float64) * 4 + 0.1  # per-layer scales differ
        w1 = (torch.randn(3, 4, generator=gen, dtype=torch.float64) * scale[0]).requires_grad_()
        w2 = (torch.randn(3, 3, generator=gen, dtype=torch.float64) * scale[1]).requires_grad_()
        gate = GradientGate(rule=rule, aux_weight=float(torch.rand((), generator=gen)) * 3, seed=seed, **options)
        for _ in range(3):  # a few steps: the EMAs and the reused weights act on later ones
            x = torch.randn(4, 4, generator=gen, dtype=torch.float64)
            h = torch.tanh(x @ w1.T) @ w2.T  # (4, 3): the shared features
            a = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64)  # linear heads of main, aux1, aux2
            losses = [(h * a[k]).sum() for k in range(3)]
            g_main = torch.cat([g.flatten() for g in torch.autograd.grad(losses[0], [w1, w2], retain_graph=True)])
            w1.grad = w2.grad = None
            gate.backward(losses[0], losses[1:], [w1, w2], features=h if options.get("similarity") else None)
            g = torch.cat([w1.grad.flatten(), w2.grad.flatten()])
            sq = float(g_main @ g_main)
            margins.append((float(g @ g_main) - sq) / (1 + sq))
    return margins


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "options", OPTION_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_proposition_1_holds_exactly_where_the_rule_says(rule, options):
    claims = get_rule(rule).keeps_main_descent(**options)
    margins = _descent_margins(rule, options, problems=25 if claims else 60)
    if claims:
        assert min(margins) >= -1e-9, (rule, options, min(margins))
    else:
        assert min(margins) < -1e-3, (rule, options, min(margins))  # a counterexample, by a clear margin


def test_the_issue_counterexample_for_per_layer_cosines():
    # layer 1: the aux gradient agrees (cos 1) but is tiny; layer 2: it disagrees (cos -0.995) and is large.
    main = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)]
    aux = [torch.tensor([0.01, 0.0], dtype=torch.float64), torch.tensor([-10.0, 1.0], dtype=torch.float64)]
    out, stats = GradientGate(per_layer=True).combine(main, [aux])
    assert bool(stats.gate_open[0]) and float(stats.cosine[0]) > 0  # the per-layer mean opens the gate
    g, g0 = torch.cat(out), torch.cat(main)
    assert float(g @ g0) == pytest.approx(2.0 + 0.01 - 10.0) and float(g @ g0) < float(g0 @ g0)
    assert not get_rule("unweighted").keeps_main_descent(per_layer=True)


def test_the_property_checks_cover_every_library_rule():
    assert {"unweighted", "weighted", "projection", "sum", "main_only", "pcgrad"} <= set(RULES)
    # and the discriminating rules do violate what they do not claim
    main, aux = torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.1])
    for rule in ("sum", "pcgrad"):
        assert not get_rule(rule).keeps_main_descent()
        out, _ = GradientGate(rule=rule).combine(main, [aux])
        assert float(out @ main) < float(main @ main)
