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
from lightning_gradsim.rl.training import GATED_RULES, METHODS
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
    """Next to the goal, moving into it: check one cell by its Bellman equation written out by hand
    (0.01 to the non-rewarding end first, then the chosen move 0.9, each other move 0.1/3)."""
    layouts = _small_layout()
    q = value_iteration(layouts, gamma=0.9)[0]
    v = q.max(-1).values
    # cell 7 (row 1, col 3): up -> 3 (goal, +1, terminal), right -> 7 (border), down -> 11 (pit), left -> 6 (mud)
    outcomes = [1.0, 0.0 + 0.9 * v[7], -1.0, -0.1 + 0.9 * v[6]]  # up, right, down, left
    expected_up = 0.99 * (0.9 * outcomes[0] + 0.1 / 3 * sum(outcomes[1:]))
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


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.3])
def test_reinforce_and_distillation_match_autograd_of_surrogates(gamma):
    """The online accumulators == autograd of sum_t (G_t - V_t).detach() log pi(a_t|s_t),
    -0.5 sum_t (G_t - V_t)^2 and -sum_t CE(teacher, pi), on primal weights, with the discounted
    return-to-go G_t = sum_k gamma^k r_{t+k} (gamma = 0.3 also exercises the traces' rescaling)."""
    spec = GridSpec(height=6, width=6, num_mud=20, num_pits=0, num_goals=0, num_gems=0, drop=0.0)
    layouts = sample_layouts(3, spec, seed=1)
    feats = cell_features(layouts)
    student = LinearStudent(cell_kernel(layouts))
    g = torch.Generator().manual_seed(3)
    student.policy = torch.randn(student.policy.shape, generator=g) * 0.02
    student.value_coef = torch.randn(student.value_coef.shape, generator=g) * 0.02
    teacher = torch.softmax(torch.randn(3, spec.num_cells, 4, generator=g), -1)
    acc = EpisodeAccumulator(student, gamma=gamma)
    sim = BatchedGridworld(layouts, generator=g)
    sim.reset(observe=False)
    traj = []
    for _ in range(16):
        pos = sim.position
        probs, values, actions = student.act(pos, g)
        assert torch.allclose(values, student.value(pos))
        acc.record(pos, probs, actions, values, teacher[torch.arange(3), pos])
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
    t_len = rewards.shape[1]
    disc = gamma ** (torch.arange(t_len).view(1, -1) - torch.arange(t_len).view(-1, 1)).clamp(min=0).float()
    returns = rewards @ (disc * torch.ones(t_len, t_len).triu()).T  # G_t = sum_{k>=t} gamma^(k-t) r_k
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
    """A corridor start -> goal with noise 0: always 'right' gets the goal unless the step drops (0.01)."""
    grid = torch.tensor([[EMPTY, GOAL], [WALL, WALL]])
    spec = GridSpec(height=2, width=2, num_goals=1, num_gems=0, num_pits=0, num_mud=0, noise=0.0, drop=0.01)
    layouts = Layouts(grid[None], torch.tensor([0]), spec)
    right = torch.zeros(1, 4, 4)
    right[..., 1] = 1.0
    assert abs(float(policy_evaluation(layouts, right)[0, 0]) - 0.99) < 1e-12
    # always 'up' (blocked): never rewarded
    up = torch.zeros(1, 4, 4)
    up[..., 0] = 1.0
    assert abs(float(policy_evaluation(layouts, up)[0, 0])) < 1e-12
    # uniform: v = 0.99 * (1/4 * 1 + 3/4 * v)  ->  v = 0.2475 / (1 - 0.7425); discounted: 3/4 * gamma * v
    uniform = torch.full((1, 4, 4), 0.25)
    assert abs(float(policy_evaluation(layouts, uniform)[0, 0]) - 0.2475 / (1 - 0.7425)) < 1e-10
    assert abs(float(policy_evaluation(layouts, uniform, gamma=0.9)[0, 0]) - 0.2475 / (1 - 0.7425 * 0.9)) < 1e-10


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
    start = [v for _, m, t, s, v, _ in a.curves if s == 0]
    assert all(abs(v - float(a.random_return["cross"].mean())) < 1e-6 for v in start)
    assert {m for _, m, *_ in a.curves} == set(METHODS)
    assert METHODS == ("reward", "distill", "add", "cos-weighted", "cos-unweighted")
    assert a.steps == [0, 60, 120]


@pytest.mark.slow
def test_gated_methods_with_zero_lambda_equal_reward():
    """Wiring check: with lambda = 0 the gated students follow exactly the 'reward' students
    (one block of rows each, so they draw the same random numbers)."""
    reward = run_experiment(_tiny(0, temperatures=(0.0,), methods=("reward",), aux_weight=0.0))
    for method in ("cos-weighted", "cos-unweighted"):
        gated = run_experiment(_tiny(0, temperatures=(0.0,), methods=(method,), aux_weight=0.0))
        assert [r[3:] for r in gated.curves] == [r[3:] for r in reward.curves]
    gated = run_experiment(_tiny(0, temperatures=(0.0,), methods=("cos-weighted",), aux_weight=1.0))
    assert [r[3:] for r in gated.curves] != [r[3:] for r in reward.curves]


def test_config_errors_and_method_names():
    with pytest.raises(ValueError, match="Unknown method"):
        ExperimentConfig(methods=("reward", "foo"))
    with pytest.raises(ValueError, match="temperatures"):
        ExperimentConfig(temperatures=(-1.0,))
    with pytest.raises(ValueError, match="transfers"):
        ExperimentConfig(transfers=("other",))
    with pytest.raises(ValueError, match="remove"):
        ExperimentConfig(remove="gem")
    with pytest.raises(ValueError, match="gamma"):
        ExperimentConfig(gamma=0.0)
    # the figure caption's names are aliases of the paper text's: cos = Algorithm 2, strict cos = Algorithm 1
    cfg = ExperimentConfig(methods=("reward", "cos", "strict_cos"))
    assert cfg.methods == ("reward", "cos-weighted", "cos-unweighted")
    assert GATED_RULES == {"cos-weighted": "weighted", "cos-unweighted": "unweighted"}


def test_teacher_is_q_learning_on_the_original_task():
    """The teacher's Q-values match value iteration on the ORIGINAL task (goal rewarding), not on the
    student's cross task."""
    spec = GridSpec(height=5, width=5, wall_prob=0.1, num_pits=1, num_mud=1)
    cfg = ExperimentConfig(
        envs=4,
        steps=2,
        eval_every=1,
        teacher_steps=2500,
        temperatures=(0.0,),
        methods=("reward", "distill"),
        spec=spec,
        seed=3,
    )
    res = run_experiment(cfg)
    assert torch.equal(res.layouts.cells, sample_layouts(4, spec, seed=3).cells)
    q_orig = value_iteration(res.layouts, gamma=cfg.gamma)
    q_cross = value_iteration(res.tasks["cross"], gamma=cfg.gamma)
    free = ~GridSpec.terminal_table()[res.layouts.flat_cells()] & (res.layouts.flat_cells() != WALL)
    err_orig = (res.q - q_orig).abs().max(-1).values[free].mean()
    err_cross = (res.q - q_cross).abs().max(-1).values[free].mean()
    assert float(err_orig) < 0.2 and float(err_cross) > 2.5 * float(err_orig), (err_orig, err_cross)


def test_transfer_same_uses_the_original_tasks_teacher_and_rewards():
    """--transfer same: the teacher is the same Q-learner as in the cross run (trained on the original
    task), and the students' task, hence their rewards and evaluation, is the original task."""
    base = dict(envs=5, steps=4, eval_every=2, teacher_steps=400, temperatures=(0.0,), methods=("reward", "add"))
    cross = run_experiment(ExperimentConfig(transfers=("cross",), **base))
    same = run_experiment(ExperimentConfig(transfers=("same",), **base))
    assert torch.equal(same.q, cross.q)
    original = sample_layouts(5, seed=0)
    assert torch.equal(same.tasks["same"].cells, original.cells) and (original.cells == GOAL).sum() == 5
    assert (cross.tasks["cross"].cells == GOAL).sum() == 0
    teacher = teacher_policy(same.q, 0.0)
    for res, task, tr in ((same, original, "same"), (cross, original.transformed(), "cross")):
        expected = policy_evaluation(task, teacher).gather(1, task.start[:, None]).squeeze(1)
        assert torch.allclose(res.teacher_return[(tr, 0.0)], expected, atol=1e-9)
        uniform = policy_evaluation(task, torch.full((5, task.spec.num_cells, 4), 0.25))
        start = uniform.gather(1, task.start[:, None]).squeeze(1)
        assert torch.allclose(res.returns[(tr, "reward", 0.0)][0], start, atol=1e-6)  # step 0: uniform
    # the two tasks really pay differently: the teacher scores higher on its own task
    assert float(same.teacher_return[("same", 0.0)].mean()) > float(cross.teacher_return[("cross", 0.0)].mean()) + 0.1


def test_gate_cosine_is_one_policy_gradient_sample():
    """The gate measures the cosine between the distillation gradient and the REINFORCE gradient of
    the single episode that just ended (the paper's footnote), in the students' parameter space,
    and applies pg + [cos >= 0] dg (Algorithm 1); checked against autograd on primal weights."""
    from lightning_gradsim.rl.training import StudentTrainer

    spec = GridSpec(height=5, width=5, num_mud=6, num_pits=0, drop=0.15)
    layouts = sample_layouts(2, spec, seed=2)
    feats = cell_features(layouts)
    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(3 * torch.randn(2, spec.num_cells, 4, generator=g), -1)
    gamma, lr = 0.9, 0.05
    tr = StudentTrainer(
        layouts, cell_kernel(layouts), torch.arange(2), teacher, ["cos-unweighted"], block=2, lr=lr, gamma=gamma, seed=1
    )
    # dual coefficients (logits = K C, K ~ 80 per entry): small, so that the policy is far from greedy
    tr.student.policy = torch.randn(tr.student.policy.shape, generator=g) * 2e-3
    tr.student.value_coef = torch.randn(tr.student.value_coef.shape, generator=g) * 2e-3
    checked, cosines = 0, []
    while checked < 4:
        w, wv = tr.student.primal(feats)
        traj = []
        while True:
            out = tr.step()
            traj.append((out.position[0], out.actions[0], float(out.reward[0])))
            if bool(out.done[0]):
                break
        w = w[0].clone().requires_grad_(True)
        rewards = torch.tensor([r for *_, r in traj])
        surrogate = ce = 0.0
        for t, (pos, action, _) in enumerate(traj):
            x = feats[0, pos]
            logp = torch.log_softmax(w @ x, -1)
            g_t = sum(gamma**k * float(r) for k, r in enumerate(rewards[t:]))
            surrogate = surrogate + (g_t - float(wv[0] @ x)) * logp[action]
            ce = ce - (teacher[0, pos] * logp).sum()
        (g_pg,) = torch.autograd.grad(surrogate, w, retain_graph=True)
        (g_ce,) = torch.autograd.grad(ce, w)
        cos = torch.nn.functional.cosine_similarity(g_pg.flatten(), -g_ce.flatten(), dim=0)
        i = int((out.gated == 0).nonzero())
        assert abs(float(out.cosine[i]) - float(cos)) < 1e-4, (float(out.cosine[i]), float(cos))
        cosines.append(float(cos))
        assert abs(float(cos)) > 1e-3  # the gate's decision is no rounding question
        assert bool(out.gate_open[i]) == bool(cos >= 0)
        # the update applied: lr * (pg + [cos >= 0] dg) / episode length, in primal weights
        expected = w.detach() + lr * (g_pg - float(cos >= 0) * g_ce) / len(traj)
        assert torch.allclose(tr.student.primal(feats)[0][0], expected, atol=1e-4)
        checked += 1
    assert len({round(c, 4) for c in cosines}) == len(cosines) and min(cosines) < 0 < max(cosines)


@pytest.mark.slow
def test_gridworld_command_end_to_end(tmp_path, capsys):
    """Tiny sizes, both transfers in one run, the caption's method names as aliases."""
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
            "--transfer",
            "both",
            "--out",
            str(out),
            "--no-progress",
            "--methods",
            "reward",
            "distill",
            "add",
            "cos",
            "strict_cos",
        ]
    )
    assert code == 0
    for name in (
        "curves.csv",
        "gate.csv",
        "summary.csv",
        "claims.md",
        "curves.png",
        "gate.png",
        "layout.png",
        "config.json",
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["transfer", "method", "temperature", "step", "mean_return", "stderr"]
    assert {r["method"] for r in rows} == set(METHODS) | {"teacher", "random"}
    learners = [r for r in rows if r["method"] not in ("teacher", "random")]
    assert len(learners) == 2 * 5 * 2 * 3  # transfers x methods x temperatures x evaluation points
    with open(out / "gate.csv") as f:
        gate = list(csv.DictReader(f))
    assert {(r["transfer"], r["method"]) for r in gate} == {
        (t, m) for t in ("cross", "same") for m in ("cos-weighted", "cos-unweighted")
    }
    assert all(0.0 <= float(r["open_fraction"]) <= 1.0 for r in gate)
    assert all(-1.0 <= float(r["expected_cosine"]) <= 1.0 and 0 <= float(r["expected_positive"]) <= 1 for r in gate)
    claims = (out / "claims.md").read_text()
    assert "| cross | 0 | distill ends lower than reward |" in claims
    assert "| same | 0.5 | add at least as good" in claims
    import matplotlib.image

    img = matplotlib.image.imread(out / "curves.png")  # 2 rows (cross, same) x 2 temperatures
    assert img.shape[0] > 600 and img.shape[1] > 800
    printed = capsys.readouterr().out
    assert "steps to reach" in printed and "[same]" in printed and "| transfer | T |" in printed
    assert main(["gridworld", "--methods", "nope"]) == 2
    assert main(["gridworld", "--transfer", "other"]) == 2
    assert "argument --transfer: invalid choice: 'other'" in capsys.readouterr().err


def _fake_result(curves: dict[tuple[str, str], list[float]], transfer: str = "cross"):
    """A hand-made result: every gridworld's return follows the given mean curve, +-0.01."""
    from lightning_gradsim.rl.experiment import ExperimentResult

    steps = [0, 100, 200, 300, 400, 500, 600]
    cfg = ExperimentConfig(
        envs=4, steps=600, temperatures=(0.0,), methods=tuple(m for _, m in curves), transfers=(transfer,)
    )
    wiggle = torch.tensor([-0.01, 0.01, -0.01, 0.01], dtype=torch.float64)
    returns = {(tr, m, 0.0): torch.tensor(c, dtype=torch.float64)[:, None] + wiggle for (tr, m), c in curves.items()}
    lay = sample_layouts(4)
    return ExperimentResult(cfg, steps, returns, [], {}, {}, {}, lay, {transfer: lay}, torch.zeros(0), {})


def test_claims_decided_from_the_curves():
    from lightning_gradsim.rl.claims import assess_claims

    paper_like = _fake_result(
        {
            ("cross", "reward"): [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            ("cross", "distill"): [0.0, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2],
            ("cross", "add"): [0.0, 0.4, 0.45, 0.45, 0.45, 0.45, 0.45],
            ("cross", "cos-weighted"): [0.0, 0.4, 0.6, 0.7, 0.7, 0.7, 0.7],  # reaches 0.6 at 200 = 600 / 3
            ("cross", "cos-unweighted"): [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.8],  # only at 300
        }
    )
    held = {c.claim: c.held for c in assess_claims(paper_like)}
    assert held == {
        "cos-weighted reaches reward's final level in 1/3 of reward's steps": True,
        "cos-unweighted reaches reward's final level in 1/3 of reward's steps": False,
        "cos-weighted ends above reward": True,
        "cos-unweighted ends above reward": True,
        "add saturates low (below the gated methods, flat at the end)": True,
        "distill ends lower than reward": True,
    }
    same = _fake_result(
        {
            ("same", "add"): [0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6],
            ("same", "cos-weighted"): [0, 0.4, 0.5, 0.6, 0.6, 0.6, 0.62],
            ("same", "cos-unweighted"): [0, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5],
        },
        transfer="same",
    )
    claims = assess_claims(same)
    assert [(c.claim, c.held, c.note) for c in claims] == [
        ("add at least as good as cos-weighted", False, ""),
        ("add at least as good as cos-unweighted", True, ""),
    ]


@pytest.mark.slow
def test_rl_package_works_without_gymnasium():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['gymnasium'] = None\n"
        "import lightning_gradsim.rl as rl\n"
        "r = rl.run_experiment(rl.ExperimentConfig("
        "envs=2, steps=4, eval_every=2, teacher_steps=4, temperatures=(0.0,)))\n"
        "assert len(r.curves) == 5 * 3\n"
        "try:\n    import lightning_gradsim.rl.env\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_expected_updates_match_the_average_of_many_episodes():
    """The exact expected per-episode updates (the noise-free cosine the gate would see) equal the
    average of many sampled episodes' REINFORCE and distillation updates (first episode of each of
    20,000 rows, a fixed stochastic policy in a 4x4 world)."""
    from lightning_gradsim.rl.expected import expected_cosine, expected_updates

    spec = GridSpec(height=4, width=4, num_pits=1, num_mud=2, drop=0.1)
    lay = sample_layouts(1, spec, seed=5)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(spec.num_cells, 4, generator=g), -1)
    teacher = torch.softmax(2 * torch.randn(spec.num_cells, 4, generator=g), -1)
    rows, gamma = 20_000, 0.9
    baseline = policy_evaluation(lay, probs[None], gamma=gamma)[0].float()  # the value baseline (low variance)
    student = LinearStudent(torch.zeros(1, spec.num_cells, spec.num_cells), torch.zeros(rows, dtype=torch.long))
    acc = EpisodeAccumulator(student, gamma=gamma)
    sim = BatchedGridworld(lay.repeat(rows), generator=g)
    sim.reset(observe=False)
    pg_sum = torch.zeros(spec.num_cells, 4)
    dg_sum = torch.zeros(spec.num_cells, 4)
    first = torch.ones(rows, dtype=torch.bool)
    while bool(first.any()):
        pos = sim.position
        p = probs[pos]
        actions = torch.multinomial(p, 1, generator=g).squeeze(1)
        acc.record(pos, p, actions, baseline[pos], teacher[pos])
        _, reward, done = sim.step(actions, observe=False)
        acc.reward(reward)
        if bool(done.any()):
            length = acc.length[done]
            taken, pg, _, dg = acc.take(done)
            keep = first[taken]
            pg_sum += (pg * length.view(-1, 1, 1))[keep].sum(0)
            dg_sum += (dg * length.view(-1, 1, 1))[keep].sum(0)
            first &= ~done
            sim.reset(mask=done, observe=False)
    exp_pg, exp_dg = expected_updates(lay, probs[None], teacher[None], gamma)
    kernel = cell_kernel(lay)
    for mc, exact, tol in ((pg_sum / rows, exp_pg[0], 0.1), (dg_sum / rows, exp_dg[0], 0.03)):
        err = (mc.double() - exact).flatten().norm() / exact.flatten().norm()
        assert float(err) < tol, float(err)  # Monte Carlo error, about 0.05 and 0.012 here
    mc_cos = expected_cosine(lay, kernel, probs[None], teacher[None], gamma)  # exact
    k = kernel[0].double()
    a, b = (pg_sum / rows).double(), (dg_sum / rows).double()
    sampled_cos = (a * (k @ b)).sum() / ((a * (k @ a)).sum() * (b * (k @ b)).sum()).sqrt()
    assert abs(float(sampled_cos) - float(mc_cos[0])) < 0.05, (float(sampled_cos), float(mc_cos[0]))
    # and it can fail: the uniform policy's expected gradient is a different vector
    other, _ = expected_updates(lay, torch.full((1, spec.num_cells, 4), 0.25), teacher[None], gamma)
    assert float((pg_sum / rows - other[0].float()).norm() / other[0].norm()) > 0.3
