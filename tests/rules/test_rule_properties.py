"""Properties every registered rule must have (as torchjd tests its aggregators): run on ALL of them.

Output shape, batch invariance (one batched ``combine`` == a loop of single problems), equivariance
to the order of the auxiliary tasks, and Proposition 1 of the paper (``g . g_main >= |g_main|^2``)
for the rules that claim it (``keeps_main_descent``). Rules that draw random numbers (PCGrad's
visiting orders) are checked on two tasks, where the order does not matter, and in distribution.
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


@pytest.mark.parametrize("rule", [r for r in RULES if get_rule(r).keeps_main_descent])
def test_proposition_1_for_the_rules_that_claim_it(rule):
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        num_aux = 1 + seed % 3
        main = torch.randn(6, generator=gen, dtype=torch.float64) * (0.0 if seed % 7 == 0 else 1.0)
        aux = [torch.randn(6, generator=gen, dtype=torch.float64) * 3 for _ in range(num_aux)]
        lam = float(torch.rand((), generator=gen)) * 4
        out, _ = GradientGate(rule=rule, aux_weight=lam, threshold=0.3 * (seed % 3)).combine(main, aux)
        assert float(out @ main) >= float(main @ main) - 1e-9 * (1 + float(main @ main)), seed


def test_the_property_checks_cover_every_library_rule():
    assert {"unweighted", "weighted", "projection", "sum", "main_only", "pcgrad"} <= set(RULES)
    # and the discriminating rules do violate what they do not claim
    main, aux = torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.1])
    for rule in ("sum", "pcgrad"):
        assert not get_rule(rule).keeps_main_descent
        out, _ = GradientGate(rule=rule).combine(main, [aux])
        assert float(out @ main) < float(main @ main)
