"""Teacher, students, gate over gridworlds, and the ``gradsim gridworld`` command."""

from __future__ import annotations

import csv

import pytest
import torch

from lightning_gradsim import GradientGate
from lightning_gradsim.rl import (
    BatchedGridworld,
    ExperimentConfig,
    GridSpec,
    Layouts,
    policy_evaluation,
    q_learning,
    run_experiment,
    sample_layouts,
    teacher_policy,
    value_iteration,
)
from lightning_gradsim.rl.student import (
    EpisodeAccumulator,
    LinearStudent,
    cell_features,
    cell_kernel,
    kernel_factor,
)
from lightning_gradsim.rl.world import EMPTY, GEM, GOAL, MUD, PIT, WALL

torch.set_num_threads(1)


def _small_layout() -> Layouts:
    grid = torch.tensor(
        [
            [EMPTY, EMPTY, EMPTY, GOAL],
            [EMPTY, WALL, MUD, EMPTY],
            [EMPTY, EMPTY, EMPTY, PIT],
            [GEM, WALL, EMPTY, EMPTY],
        ]
    )
    spec = GridSpec(height=4, width=4, num_goals=1, num_gems=1, num_pits=1, num_mud=1, noise=0.1, drop=0.01)
    return Layouts(grid[None], torch.tensor([9]), spec)


def test_value_iteration_hand_checked_cell():
    """Next to the goal, moving into it: Q = 0.9 * 1 + 0.1/4 * (1 + stay-value terms); check one
    cell by its Bellman equation written out by hand."""
    layouts = _small_layout()
    q = value_iteration(layouts, gamma=0.9)[0]
    v = q.max(-1).values
    # cell 7 (row 1, col 3): up -> 3 (goal, +1, terminal), right -> 7 (border), down -> 11 (pit), left -> 6 (mud)
    cont = 0.99 * 0.9
    outcomes = [1.0, 0.0 + cont * v[7], -1.0, -0.1 + cont * v[6]]  # up, right, down, left
    expected_up = 0.9 * outcomes[0] + 0.1 / 4 * sum(outcomes)
    assert abs(float(q[7, 0]) - float(expected_up)) < 1e-8


@pytest.mark.slow
def test_q_learning_converges_to_value_iteration():
    layouts = _small_layout()
    copies = 64
    q = q_learning(layouts.repeat(copies), steps=3_000, gamma=0.9, generator=torch.Generator().manual_seed(0))
    q_star = value_iteration(layouts, gamma=0.9)[0]
    reachable = (layouts.flat_cells()[0] == EMPTY) | (layouts.flat_cells()[0] == MUD)
    err = (q.mean(0) - q_star).abs()[reachable]
    assert float(err.max()) < 0.05, err.max()
    # the greedy policies agree wherever the optimal action is clear
    gap = q_star.topk(2, -1).values
    clear = reachable & ((gap[:, 0] - gap[:, 1]) > 0.05)
    assert clear.sum() >= 5
    assert torch.equal(q.mean(0).argmax(-1)[clear], q_star.argmax(-1)[clear])
    # and a random initial guess does not (so the check can fail)
    assert float((torch.zeros_like(q_star) - q_star).abs()[reachable].max()) > 0.05


def test_teacher_policy_temperatures():
    q = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.allclose(teacher_policy(q, 0.0), torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    assert torch.allclose(teacher_policy(q, 1.0), torch.softmax(q, -1))
    with pytest.raises(ValueError, match="temperature"):
        teacher_policy(q, -1.0)


def test_dual_student_equals_primal_linear_model():
    layouts = sample_layouts(3, seed=4)
    feats = cell_features(layouts)  # (3, S, D)
    student = LinearStudent(cell_kernel(layouts))
    g = torch.Generator().manual_seed(0)
    student.policy = torch.randn(student.policy.shape, generator=g) * 0.01
    student.value_coef = torch.randn(student.value_coef.shape, generator=g) * 0.01
    w, wv = student.primal(feats)
    pos = torch.tensor([5, 17, 60])
    x = feats[torch.arange(3), pos]
    assert torch.allclose(student.logits(pos), torch.einsum("bad,bd->ba", w, x), atol=1e-5)
    assert torch.allclose(student.value(pos), (wv * x).sum(-1), atol=1e-5)
    assert torch.allclose(student.all_logits(), torch.einsum("bad,bsd->bsa", w, feats), atol=1e-4)
    # the kernel factor gives parameter-space dot products
    factor = kernel_factor(cell_kernel(layouts))
    c1, c2 = torch.randn(2, 3, layouts.spec.num_cells, 4, generator=g)
    primal_dot = (torch.einsum("bsa,bsd->bad", c1, feats) * torch.einsum("bsa,bsd->bad", c2, feats)).sum((1, 2))
    z_dot = (torch.bmm(factor.transpose(1, 2), c1) * torch.bmm(factor.transpose(1, 2), c2)).sum((1, 2))
    assert torch.allclose(primal_dot, z_dot, rtol=1e-3)


def test_reinforce_and_distillation_match_autograd_of_surrogates():
    """The online accumulators == autograd of sum_t (G_t - V_t).detach() log pi(a_t|s_t),
    -0.5 sum_t (G_t - V_t)^2 and -sum_t CE(teacher, pi), on primal weights."""
    spec = GridSpec(height=6, width=6, num_mud=20, num_pits=0, num_goals=0, num_gems=0, drop=0.0)
    layouts = sample_layouts(3, spec, seed=1)
    feats = cell_features(layouts)
    student = LinearStudent(cell_kernel(layouts))
    g = torch.Generator().manual_seed(3)
    student.policy = torch.randn(student.policy.shape, generator=g) * 0.02
    student.value_coef = torch.randn(student.value_coef.shape, generator=g) * 0.02
    teacher = torch.softmax(torch.randn(3, spec.num_cells, 4, generator=g), -1)
    acc = EpisodeAccumulator(student)
    sim = BatchedGridworld(layouts, generator=g)
    sim.reset(observe=False)
    traj = []
    for _ in range(12):
        pos = sim.position
        probs, actions = student.act(pos, g)
        acc.record(pos, probs, actions, student.value(pos), teacher[torch.arange(3), pos])
        _, reward, _ = sim.step(actions, observe=False)
        acc.reward(reward)
        traj.append((pos, actions, reward))
    assert any(bool((r != 0).any()) for _, _, r in traj)
    rows, pg, vg, dg = acc.take(torch.ones(3, dtype=torch.bool))
    assert rows.tolist() == [0, 1, 2]

    w, wv = student.primal(feats)
    w = w.clone().requires_grad_(True)
    wv = wv.clone().requires_grad_(True)
    rewards = torch.stack([r for _, _, r in traj], 1)  # (B, T)
    returns = rewards.flip(1).cumsum(1).flip(1)
    surrogate = value_loss = ce = 0.0
    for t, (pos, actions, _) in enumerate(traj):
        x = feats[torch.arange(3), pos]
        logp = torch.log_softmax(torch.einsum("bad,bd->ba", w, x), -1)
        v = (wv * x).sum(-1)
        surrogate = surrogate + ((returns[:, t] - v).detach() * logp.gather(1, actions[:, None]).squeeze(1)).sum()
        value_loss = value_loss + 0.5 * ((returns[:, t] - v) ** 2).sum()
        ce = ce - (teacher[torch.arange(3), pos] * logp).sum()
    (g_pg,) = torch.autograd.grad(surrogate, w, retain_graph=True)
    (g_v,) = torch.autograd.grad(value_loss, wv, retain_graph=True)
    (g_ce,) = torch.autograd.grad(ce, w)
    steps = len(traj)  # the accumulator returns means over the episode's steps
    assert torch.allclose(torch.einsum("bsa,bsd->bad", pg, feats) * steps, g_pg, atol=1e-4)
    assert torch.allclose(torch.einsum("bs,bsd->bd", vg, feats) * steps, -g_v, atol=1e-4)
    assert torch.allclose(torch.einsum("bsa,bsd->bad", dg, feats) * steps, -g_ce, atol=1e-4)
    assert float(g_pg.abs().max()) > 1e-3  # a non-trivial check
    # taken rows start afresh
    assert float(acc.policy_update.abs().max()) == 0.0 and float(acc.trace_score.abs().max()) == 0.0


@pytest.mark.parametrize("rule", ["weighted", "unweighted", "projection"])
def test_batched_combine_equals_loop_of_single_gates(rule):
    g = torch.Generator().manual_seed(0)
    rows, steps = 5, 4
    batched = GradientGate(rule=rule, aux_weight=0.7, cosine_ema=0.5)
    singles = [GradientGate(rule=rule, aux_weight=0.7, cosine_ema=0.5) for _ in range(rows)]
    for _ in range(steps):
        main = torch.randn(rows, 3, 4, generator=g)
        aux = torch.randn(rows, 3, 4, generator=g) + 0.5 * main
        out, stats = batched.combine(main, {"distill": aux}, batch_dims=1)
        for i, gate in enumerate(singles):
            o, s = gate.combine(main[i], {"distill": aux[i]})
            assert torch.allclose(out[i], o, atol=1e-6)
            assert torch.allclose(stats.cosine[i], s.cosine, atol=1e-6)
            assert torch.allclose(stats.smoothed_cosine[i], s.smoothed_cosine, atol=1e-6)
            assert torch.equal(stats.gate_open[i], s.gate_open)
    # the hand-written rule for the weighted gate: main + lambda * max(0, smoothed cos) * aux
    if rule == "weighted":
        expected = main + 0.7 * stats.smoothed_cosine.clamp(min=0).view(rows, 1, 1) * aux
        assert torch.allclose(out, expected, atol=1e-6)


def test_policy_evaluation_hand_checked():
    """A corridor start -> goal with noise 0: always 'right' gets 0.99^0 * 1 in one step."""
    grid = torch.tensor([[EMPTY, GOAL], [WALL, WALL]])
    spec = GridSpec(height=2, width=2, num_goals=1, num_gems=0, num_pits=0, num_mud=0, noise=0.0, drop=0.01)
    layouts = Layouts(grid[None], torch.tensor([0]), spec)
    right = torch.zeros(1, 4, 4)
    right[..., 1] = 1.0
    assert abs(float(policy_evaluation(layouts, right)[0, 0]) - 1.0) < 1e-12
    # always 'up' (blocked): never rewarded
    up = torch.zeros(1, 4, 4)
    up[..., 0] = 1.0
    assert abs(float(policy_evaluation(layouts, up)[0, 0])) < 1e-12
    # uniform: v = 1/4 * 1 + 3/4 * 0.99 * v  ->  v = 0.25 / (1 - 0.7425)
    uniform = torch.full((1, 4, 4), 0.25)
    assert abs(float(policy_evaluation(layouts, uniform)[0, 0]) - 0.25 / (1 - 0.75 * 0.99)) < 1e-10


def _tiny(seed: int = 0, **kw) -> ExperimentConfig:
    base = dict(envs=6, steps=120, seed=seed, temperatures=(0.0, 1.0), eval_every=60, teacher_steps=300)
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.mark.slow
def test_experiment_deterministic_by_seed():
    a = run_experiment(_tiny(0))
    b = run_experiment(_tiny(0))
    c = run_experiment(_tiny(1))
    assert a.curves == b.curves and a.gate == b.gate
    assert a.curves != c.curves
    # step 0: every student is uniform, so every method starts at the random policy's return
    start = [v for m, t, s, v, _ in a.curves if s == 0]
    assert all(abs(v - a.random_return[0]) < 1e-6 for v in start)
    methods = {m for m, *_ in a.curves}
    assert methods == {"reward", "distill", "add", "cos", "strict_cos"}
    assert sorted({s for _, _, s, _, _ in a.curves}) == [0, 60, 120]


@pytest.mark.slow
def test_gated_methods_with_zero_lambda_equal_reward():
    """Wiring check: with lambda = 0 the gated students follow exactly the 'reward' students
    (one block of rows each, so they draw the same random numbers)."""
    reward = run_experiment(_tiny(0, temperatures=(0.0,), methods=("reward",), aux_weight=0.0))
    for method in ("cos", "strict_cos"):
        gated = run_experiment(_tiny(0, temperatures=(0.0,), methods=(method,), aux_weight=0.0))
        assert [r[2:] for r in gated.curves] == [r[2:] for r in reward.curves]
    gated = run_experiment(_tiny(0, temperatures=(0.0,), methods=("cos",), aux_weight=1.0))
    assert [r[2:] for r in gated.curves] != [r[2:] for r in reward.curves]


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown methods"):
        ExperimentConfig(methods=("reward", "foo"))
    with pytest.raises(ValueError, match="temperatures"):
        ExperimentConfig(temperatures=(-1.0,))


@pytest.mark.slow
def test_gridworld_command_writes_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lightning_gradsim.cli import main

    out = tmp_path / "gw"
    code = main(
        [
            "gridworld",
            "--envs",
            "4",
            "--steps",
            "60",
            "--eval-every",
            "30",
            "--teacher-steps",
            "200",
            "--temperatures",
            "0",
            "0.5",
            "--seed",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    for name in ("curves.csv", "gate.csv", "summary.csv", "curves.png", "layout.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["method", "temperature", "step", "mean_return", "stderr"]
    methods = {r["method"] for r in rows}
    assert methods == {"reward", "distill", "add", "cos", "strict_cos", "teacher", "random"}
    learners = [r for r in rows if r["method"] not in ("teacher", "random")]
    assert len(learners) == 5 * 2 * 3  # methods x temperatures x evaluation points
    import matplotlib.image

    img = matplotlib.image.imread(out / "curves.png")
    assert img.shape[1] > img.shape[0] > 100
    assert "steps to reach" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["gridworld", "--methods", "nope"])


@pytest.mark.slow
def test_rl_package_works_without_gymnasium():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['gymnasium'] = None\n"
        "import lightning_gradsim.rl as rl\n"
        "r = rl.run_experiment(rl.ExperimentConfig(envs=2, steps=4, eval_every=2, teacher_steps=4, temperatures=(0.0,)))\n"
        "assert len(r.curves) == 5 * 3\n"
        "try:\n    import lightning_gradsim.rl.env\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
