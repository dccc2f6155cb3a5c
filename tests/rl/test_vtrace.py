"""V-trace (IMPALA) against loops written from its definition."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradsim.rl.vtrace import from_importance_weights


def _definition(log_rhos, discounts, rewards, values, bootstrap, rho_bar, pg_rho_bar):
    """v_s = V(x_s) + sum_{t>=s} (prod_{i=s}^{t-1} gamma_i c_i) delta_t, written as plain sums (no recursion)."""
    t_len, b_len = log_rhos.shape
    rho = [[math.exp(float(log_rhos[t, b])) for b in range(b_len)] for t in range(t_len)]
    vs = [[0.0] * b_len for _ in range(t_len)]
    adv = [[0.0] * b_len for _ in range(t_len)]

    def v(t, b):
        return float(values[t, b]) if t < t_len else float(bootstrap[b])

    for b in range(b_len):
        for s in range(t_len):
            total = v(s, b)
            for t in range(s, t_len):
                prod = 1.0
                for i in range(s, t):
                    prod *= float(discounts[i, b]) * min(1.0, rho[i][b])
                clipped = rho[t][b] if rho_bar is None else min(rho_bar, rho[t][b])
                delta = clipped * (float(rewards[t, b]) + float(discounts[t, b]) * v(t + 1, b) - v(t, b))
                total += prod * delta
            vs[s][b] = total
        for s in range(t_len):
            nxt = vs[s + 1][b] if s + 1 < t_len else float(bootstrap[b])
            clipped = rho[s][b] if pg_rho_bar is None else min(pg_rho_bar, rho[s][b])
            adv[s][b] = clipped * (float(rewards[s, b]) + float(discounts[s, b]) * nxt - v(s, b))
    return torch.tensor(vs, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)


def _random_inputs(seed, t_len=7, b_len=5):
    g = torch.Generator().manual_seed(seed)
    log_rhos = torch.randn(t_len, b_len, generator=g, dtype=torch.float64)
    # Episode ends inside the window: zero discounts at random steps.
    discounts = 0.9 * (torch.rand(t_len, b_len, generator=g, dtype=torch.float64) > 0.25).double()
    rewards = torch.randn(t_len, b_len, generator=g, dtype=torch.float64)
    values = torch.randn(t_len, b_len, generator=g, dtype=torch.float64)
    bootstrap = torch.randn(b_len, generator=g, dtype=torch.float64)
    return log_rhos, discounts, rewards, values, bootstrap


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rho_bar,pg_rho_bar", [(1.0, 1.0), (2.0, 0.5), (None, None)])
def test_vtrace_matches_the_definition(seed, rho_bar, pg_rho_bar):
    inputs = _random_inputs(seed)
    assert (inputs[1] == 0).any(), "the window must contain episode ends"
    out = from_importance_weights(*inputs, clip_rho_threshold=rho_bar, clip_pg_rho_threshold=pg_rho_bar)
    vs, adv = _definition(*inputs, rho_bar, pg_rho_bar)
    torch.testing.assert_close(out.vs, vs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pg_advantages, adv, rtol=1e-10, atol=1e-10)


def test_on_policy_vtrace_is_the_n_step_return():
    _, discounts, rewards, values, bootstrap = _random_inputs(3, t_len=6, b_len=4)
    out = from_importance_weights(torch.zeros_like(rewards), discounts, rewards, values, bootstrap)
    t_len = rewards.shape[0]
    for s in range(t_len):
        ret = torch.zeros(4, dtype=torch.float64)
        scale = torch.ones(4, dtype=torch.float64)
        for t in range(s, t_len):
            ret = ret + scale * rewards[t]
            scale = scale * discounts[t]
        ret = ret + scale * bootstrap  # bootstrapped from V(x_T), cut where an episode ended
        torch.testing.assert_close(out.vs[s], ret)
        nxt = out.vs[s + 1] if s + 1 < t_len else bootstrap
        torch.testing.assert_close(out.pg_advantages[s], rewards[s] + discounts[s] * nxt - values[s])


def test_vtrace_trailing_dims_no_grad_and_errors():
    inputs = [
        x.float().reshape(7, 5, 1).expand(7, 5, 2).contiguous() if x.dim() == 2 else x.float()
        for x in _random_inputs(4)
    ]
    inputs[4] = inputs[4].reshape(5, 1).expand(5, 2).contiguous()
    values = inputs[3].clone().requires_grad_(True)
    out = from_importance_weights(inputs[0], inputs[1], inputs[2], values, inputs[4])
    assert out.vs.shape == (7, 5, 2) and not out.vs.requires_grad and not out.pg_advantages.requires_grad
    torch.testing.assert_close(out.vs[..., 0], out.vs[..., 1])
    with pytest.raises(ValueError, match="bootstrap_value has shape"):
        from_importance_weights(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4][:3])
    with pytest.raises(ValueError, match="rewards has shape"):
        from_importance_weights(inputs[0], inputs[1], inputs[2][:2], inputs[3], inputs[4])
    with pytest.raises(ValueError, match="clip_rho_threshold"):
        from_importance_weights(*inputs, clip_rho_threshold=0.0)
