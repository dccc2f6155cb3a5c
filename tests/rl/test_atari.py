"""Atari distillation experiment (paper 4.4): losses, the gate on the two update vectors, teacher, CLI."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

pytest.importorskip("minatar")

from lightning_gradsim.rl.atari.envs import MinAtarVectorEnv
from lightning_gradsim.rl.atari.learner import (
    BatchedLearner,
    LearnerConfig,
    Rollout,
    actor_critic_losses,
    distillation_loss,
)
from lightning_gradsim.rl.atari.nets import StackedActorCritic
from lightning_gradsim.rl.atari.teacher import default_teacher_path, evaluate_policy, load_teacher


def test_distillation_loss_and_gradient_by_hand():
    s = torch.tensor([[[[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]]], requires_grad=True)  # [T=1, M=1, N=2, A=3]
    t = torch.tensor([[[[1.0, 1.0, 1.0], [0.0, math.log(3.0), 0.0]]]])
    loss = distillation_loss(s, t)
    # State 1: teacher uniform. State 2: teacher (1/5, 3/5, 1/5).
    ps1 = [math.exp(x) / (1 + math.e + math.exp(-1)) for x in (0.0, 1.0, -1.0)]
    ps2 = [math.exp(x) / (math.exp(2) + 2) for x in (2.0, 0.0, 0.0)]
    pt1, pt2 = [1 / 3] * 3, [0.2, 0.6, 0.2]
    kl1 = sum(p * math.log(p / q) for p, q in zip(pt1, ps1))
    kl2 = sum(p * math.log(p / q) for p, q in zip(pt2, ps2))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    expected = torch.tensor([[[[(a - b) / 2 for a, b in zip(ps1, pt1)], [(a - b) / 2 for a, b in zip(ps2, pt2)]]]])
    torch.testing.assert_close(grad, expected)


def test_actor_critic_loss_on_policy_by_hand():
    # T=2, M=1, N=1, two actions; on-policy (behaviour = target) so V-trace is the 2-step return.
    logits = torch.tensor([[[[0.0, 0.0]]], [[[math.log(3.0), 0.0]]]], requires_grad=True)
    values = torch.tensor([[[0.5]], [[1.0]]])
    loss = actor_critic_losses(
        logits,
        values,
        torch.tensor([[2.0]]),
        torch.tensor([[[0]], [[1]]]),
        logits.detach(),
        torch.tensor([[[1.0]], [[0.0]]]),
        torch.tensor([[[0.5]], [[0.5]]]),
        entropy_cost=0.1,
        baseline_cost=0.5,
    )
    vs1 = 0.0 + 0.5 * 2.0
    vs0 = 1.0 + 0.5 * vs1
    adv0, adv1 = 1.0 + 0.5 * vs1 - 0.5, 0.0 + 0.5 * 2.0 - 1.0
    logp0, logp1 = math.log(0.5), math.log(0.25)
    ent0 = math.log(2.0)
    ent1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    pg = -(logp0 * adv0 + logp1 * adv1) / 2
    base = 0.5 * 0.5 * ((vs0 - 0.5) ** 2 + (vs1 - 1.0) ** 2) / 2
    ent = -0.1 * (ent0 + ent1) / 2
    assert loss.item() == pytest.approx(pg + base + ent, rel=1e-6)


def test_stacked_members_are_independent_networks():
    net = StackedActorCritic(3, (4, 10, 10), 6, seeds=[5, 6, 7])
    obs = torch.rand(3, 4, 4, 10, 10)
    logits, values = net(obs)
    single = StackedActorCritic(1, (4, 10, 10), 6)
    single.load_member_state(net.member_state(1))
    l1, v1 = single(obs[1:2])
    torch.testing.assert_close(logits[1:2], l1)
    torch.testing.assert_close(values[1:2], v1)
    loss = (logits**2).sum() + values.sum()
    g_all = torch.autograd.grad(loss, net.fc_weight)[0]
    g_one = torch.autograd.grad((l1**2).sum() + v1.sum(), single.fc_weight)[0]
    torch.testing.assert_close(g_all[1:2], g_one)


def _rollout(seed, t_len, m, n, shape, actions):
    g = torch.Generator().manual_seed(seed)
    return Rollout(
        obs=(torch.rand(t_len + 1, m, n, *shape, generator=g) > 0.7).float(),
        actions=torch.randint(actions, (t_len, m, n), generator=g),
        behaviour_logits=torch.randn(t_len, m, n, actions, generator=g),
        rewards=(torch.rand(t_len, m, n, generator=g) > 0.8).float(),
        dones=torch.rand(t_len, m, n, generator=g) > 0.9,
        game=torch.zeros(n, dtype=torch.long),
    )


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("cosine_of", ["policy_gradient", "actor_critic"])
def test_gate_on_the_two_update_vectors_matches_hand_gating(cosine_of):
    """The gate decides on the cosine of the KL gradient with the policy-gradient term alone (the text,
    default) or with the whole RL gradient (option); either way the update is g_rl + w g_kl."""
    shape, actions, t_len, n = (2, 4, 4), 3, 4, 3
    methods = ["rl", "kl", "rl_kl", "rl_kl_cos", "rl_kl_cos"]
    seeds = [0, 0, 0, 0, 1]
    teacher = StackedActorCritic(1, shape, actions, seeds=[99])
    batches = [_rollout(s, t_len, len(methods), n, shape, actions) for s in range(4)]
    lam, beta = 0.7, 0.5

    # Hand computation, one member at a time, with single-member networks.
    hand_cos: list[list[float]] = []
    vectors = []
    for i, seed in enumerate(seeds):
        single = StackedActorCritic(1, shape, actions, seeds=[seed])
        shared, heads = single.shared_parameters(), single.value_parameters()
        per_step = []
        for b in batches:
            obs = b.obs[:, i : i + 1].transpose(0, 1).reshape(1, (t_len + 1) * n, *shape)
            logits, values = single(obs)
            logits = logits.reshape(1, t_len + 1, n, -1).transpose(0, 1)
            values = values.reshape(1, t_len + 1, n).transpose(0, 1)
            member = (
                logits[:-1],
                values[:-1],
                values[-1],
                b.actions[:, i : i + 1],
                b.behaviour_logits[:, i : i + 1],
                b.rewards[:, i : i + 1],
                0.99 * (~b.dones[:, i : i + 1]).float(),
            )
            rl = actor_critic_losses(*member, 0.01, 0.5)
            t_logits, _ = teacher(b.obs[:-1, i : i + 1].reshape(1, t_len * n, *shape))
            kl = distillation_loss(logits[:-1], t_logits.reshape(t_len, 1, n, -1))
            pg = actor_critic_losses(*member, 0.0, 0.0)  # the policy-gradient term alone: no baseline, no entropy
            g_rl = torch.autograd.grad(rl.sum(), shared + heads, retain_graph=True)
            g_pg = torch.autograd.grad(pg.sum(), shared, retain_graph=True)
            g_kl = torch.autograd.grad(kl.sum(), shared)
            per_step.append((g_rl, g_kl, g_pg if cosine_of == "policy_gradient" else g_rl[: len(shared)]))
        vectors.append(per_step)
        cos = [sum(_cos(a, c) for a, c in zip(g_main, g_kl)) / len(shared) for _, g_kl, g_main in per_step]
        hand_cos.append(cos)
    # A threshold between the gated members' smoothed cosines at some step, so the gate opens and closes.
    smoothed = []
    for cos in hand_cos:
        s_t, row = None, []
        for c in cos:
            s_t = c if s_t is None else beta * s_t + (1 - beta) * c
            row.append(s_t)
        smoothed.append(row)
    gated_values = sorted(smoothed[3] + smoothed[4])
    threshold = 0.5 * (gated_values[3] + gated_values[4])

    net = StackedActorCritic(len(methods), shape, actions, seeds=seeds)
    cfg = LearnerConfig(
        aux_weight=lam, threshold=threshold, cosine_ema=beta, rule="weighted", max_grad_norm=0.0, cosine_of=cosine_of
    )
    learner = BatchedLearner(net, methods, teacher, cfg)
    opened = set()
    for step, b in enumerate(batches):
        grads, stats = learner.compute_update(b)
        for i, meth in enumerate(methods):
            g_rl, g_kl, _ = vectors[i][step]
            n_shared = len(g_kl)
            s_t = smoothed[i][step]
            w = {"rl": 0.0, "kl": lam, "rl_kl": lam, "rl_kl_cos": lam * max(0.0, s_t) * (s_t >= threshold)}[meth]
            main = 0.0 if meth == "kl" else 1.0
            if meth == "rl_kl_cos":
                opened.add(s_t >= threshold)
            assert stats.cosine[i].item() == pytest.approx(s_t, abs=1e-5)
            assert stats.aux_weight[i].item() == pytest.approx(w, abs=1e-5)
            for k, g in enumerate(grads):
                expected = g_rl[k] if k >= n_shared else main * g_rl[k] + w * g_kl[k]
                torch.testing.assert_close(g[i], expected[0], rtol=1e-4, atol=1e-6)
    assert opened == {True, False}
    if cosine_of == "policy_gradient":  # the two readings differ here: the test tells them apart
        whole = [sum(_cos(a, c) for a, c in zip(g_rl[: len(g_kl)], g_kl)) / len(g_kl) for g_rl, g_kl, _ in vectors[3]]
        assert max(abs(a - b) for a, b in zip(whole, hand_cos[3])) > 1e-3
    with pytest.raises(ValueError, match="cosine_of"):
        BatchedLearner(net, methods, teacher, LearnerConfig(cosine_of="value"))


def test_minatar_vector_env_matches_single_games():
    from minatar import Environment

    env = MinAtarVectorEnv(["breakout", "asterix"], seeds=[3, 4])
    singles = []
    for game, seed in (("breakout", 3), ("asterix", 4)):
        e = Environment(game, sticky_action_prob=0.1)
        e.seed(seed)
        e.reset()
        singles.append(e)
    obs = env.reset()
    rng = np.random.default_rng(0)
    totals, ended = [0.0, 0.0], [[], []]
    for _ in range(400):
        for i, e in enumerate(singles):
            np.testing.assert_array_equal(obs[i], e.state().transpose(2, 0, 1))
        a = rng.integers(0, 6, size=2)
        step = env.step(a)
        for i, e in enumerate(singles):
            r, done = e.act(int(a[i]))
            assert step.reward[i] == r and step.done[i] == done
            totals[i] += r
            if done:
                ended[i].append(totals[i])
                assert step.episode_return[i] == totals[i]
                totals[i] = 0.0
                e.reset()
            else:
                assert np.isnan(step.episode_return[i])
        obs = step.obs
    assert all(ended), "both games should have ended episodes in 400 random steps"
    with pytest.raises(ValueError, match="channel counts"):
        MinAtarVectorEnv(["breakout", "seaquest"], seeds=[0, 1])


def test_packaged_teacher_beats_random():
    teacher, info = load_teacher(default_teacher_path("minatar"))
    assert info["game"] == "breakout" and info["frames"] > 0 and "command" in info
    t_ret, t_n = evaluate_policy(teacher, "minatar", "breakout", episodes=16, seed=7)
    r_ret, r_n = evaluate_policy(None, "minatar", "breakout", episodes=16, seed=7)
    assert t_n == r_n == 16
    assert t_ret > r_ret + 1.0, (t_ret, r_ret)


def _read_curves(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_end_to_end_single_multi_and_teacher(tmp_path):
    from lightning_gradsim.cli import main

    out = tmp_path / "single"
    assert (
        main(
            [
                "atari",
                "--frames",
                "320",
                "--seeds",
                "1",
                "--envs",
                "4",
                "--unroll",
                "8",
                "--out",
                str(out),
                "--no-progress",
                "--log-every",
                "64",
            ]
        )
        == 0
    )
    rows = _read_curves(out / "curves.csv")
    assert list(rows[0])[:6] == ["method", "seed", "frames", "game", "mean_return", "cosine"]
    assert {"aux_weight"} <= set(rows[0])
    assert {r["method"] for r in rows} == {"rl", "kl", "rl_kl", "rl_kl_cos"}
    assert max(int(r["frames"]) for r in rows) == 320
    weights = {r["method"]: float(r["aux_weight"]) for r in rows}
    assert weights["rl"] == 0.0 and weights["rl_kl"] == 1.0
    assert (out / "curves.png").stat().st_size > 10_000

    teacher = tmp_path / "teacher.pt"
    assert (
        main(
            [
                "atari",
                "teacher",
                "--frames",
                "256",
                "--envs",
                "4",
                "--unroll",
                "8",
                "--eval-episodes",
                "2",
                "--out",
                str(teacher),
                "--no-progress",
            ]
        )
        == 0
    )
    _, info = load_teacher(teacher)
    assert info["frames"] == 256 and info["command"].startswith("gradsim atari teacher")

    out2 = tmp_path / "multi"
    assert (
        main(
            [
                "atari",
                "--env",
                "breakout,asterix",
                "--frames",
                "256",
                "--seeds",
                "1",
                "--envs",
                "4",
                "--unroll",
                "8",
                "--methods",
                "rl,rl_kl_cos",
                "--teacher",
                str(teacher),
                "--out",
                str(out2),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = _read_curves(out2 / "curves.csv")
    assert {r["game"] for r in rows} == {"breakout", "asterix"}
    gated = [r for r in rows if r["method"] == "rl_kl_cos"]
    assert all(-1.0 <= float(r["cosine"]) <= 1.0 for r in gated)
    assert (out2 / "curves.png").stat().st_size > 10_000
    assert (
        main(["atari", "--env", "breakout,seaquest", "--frames", "64", "--out", str(tmp_path / "x"), "--no-progress"])
        == 2
    )


@pytest.mark.slow
def test_ale_backend_smoke(tmp_path):
    pytest.importorskip("ale_py")
    from lightning_gradsim.rl.atari.experiment import AtariConfig, run_experiment
    from lightning_gradsim.rl.atari.teacher import save_teacher

    teacher = save_teacher(
        StackedActorCritic(1, (4, 84, 84), 18, arch="nature"), 0, tmp_path / "ale.pt", backend="ale", game="breakout"
    )
    cfg = AtariConfig(
        games=("breakout", "ms_pacman"),
        backend="ale",
        frames=320,
        seeds=1,
        methods=("rl", "rl_kl_cos"),
        envs=2,
        unroll=10,
        teacher=str(teacher),
        random_episodes=0,
    )
    result = run_experiment(cfg)
    assert result.frames_total == 2 * 320
    assert {r[3] for r in result.curves} == {"breakout", "ms_pacman"}
    assert result.net is not None and result.net.arch == "nature"
    assert all(math.isfinite(r[5]) for r in result.curves if r[0] == "rl_kl_cos")
