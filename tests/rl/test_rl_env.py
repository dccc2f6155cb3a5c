"""Gridworld dynamics: the gymnasium environment, the batched simulator, and their agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
stats = pytest.importorskip("scipy.stats")

from lightning_gradsim.rl import ENV_ID, BatchedGridworld, GridSpec, Layouts, policy_evaluation, sample_layouts  # noqa: E402
from lightning_gradsim.rl.env import GridworldEnv  # noqa: E402
from lightning_gradsim.rl.world import EMPTY, GEM, GOAL, MUD, PIT, WALL, windows  # noqa: E402

torch.set_num_threads(1)
UP, RIGHT, DOWN, LEFT = range(4)


def _layout(grid: list[list[int]], start: int, **spec_kw) -> tuple[Layouts, GridSpec]:
    cells = torch.tensor(grid)
    spec = GridSpec(
        height=cells.shape[0], width=cells.shape[1], num_goals=0, num_gems=0, num_pits=0, num_mud=0, **spec_kw
    )
    return Layouts(cells[None], torch.tensor([start]), spec), spec


def test_registered_and_check_env():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(ENV_ID, layout_seed=3, layout_index=2, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=0)
    assert obs.shape == (9, 9) and env.observation_space.contains(obs)
    assert obs[4, 4] != WALL and info["position"] == env.unwrapped.start
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (16 * 10, 16 * 10, 3)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="task must be"):
        GridworldEnv(task="other")
    with pytest.raises(ValueError, match="at least 2x2"):
        GridSpec(height=1)
    with pytest.raises(ValueError, match="special cells"):
        GridSpec(height=2, width=2)
    env = GridworldEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="Invalid action"):
        env.step(7)


def test_walls_and_borders_block_and_rewards():
    grid = [
        [EMPTY, WALL, GEM],
        [EMPTY, MUD, EMPTY],
        [PIT, EMPTY, GOAL],
    ]
    spec_kw = dict(noise=0.0, drop=0.0)
    _, spec = _layout(grid, 0, **spec_kw)
    env = GridworldEnv(cells=np.array(grid), start=0, spec=spec)
    env.reset(seed=0)
    for action in (UP, LEFT, RIGHT):  # border, border, wall
        _, reward, terminated, truncated, info = env.step(action)
        assert info["position"] == 0 and reward == 0.0 and not terminated and not truncated
    _, reward, terminated, _, info = env.step(DOWN)
    assert info["position"] == 3 and reward == 0.0
    _, reward, terminated, _, info = env.step(RIGHT)  # into mud: negative, not terminal
    assert info["position"] == 4 and reward == spec.reward_mud and not terminated
    _, reward, terminated, _, info = env.step(UP)  # wall above the mud: stay, mud again
    assert info["position"] == 4 and reward == spec.reward_mud and not terminated
    _, reward, terminated, _, info = env.step(RIGHT)
    _, reward, terminated, _, info = env.step(UP)  # gem: positive and terminal
    assert info["position"] == 2 and reward == spec.reward_gem and terminated
    # transformed task: the goal is an empty cell
    env2 = GridworldEnv(cells=np.array(grid), start=5, spec=spec, task="transformed")
    env2.reset(seed=0)
    _, reward, terminated, _, _ = env2.step(DOWN)
    assert reward == 0.0 and not terminated
    env3 = GridworldEnv(cells=np.array(grid), start=5, spec=spec)
    env3.reset(seed=0)
    _, reward, terminated, _, _ = env3.step(DOWN)
    assert reward == spec.reward_goal and terminated
    # the batched simulator moves the same way
    layouts, _ = _layout(grid, 0, **spec_kw)
    sim = BatchedGridworld(layouts.repeat(4))
    sim.reset()
    _, r, t = sim.step(torch.tensor([UP, LEFT, RIGHT, DOWN]), observe=False)
    assert sim.position.tolist() == [0, 0, 0, 3] and not t.any() and (r == 0).all()


def test_window_at_borders():
    spec = GridSpec()
    env = GridworldEnv(layout_seed=1, layout_index=0, spec=spec)
    obs = env.observe(0)  # top-left corner
    assert (obs[:4, :] == WALL).all() and (obs[:, :4] == WALL).all()
    np.testing.assert_array_equal(obs[4:, 4:], env.grid[:5, :5])
    obs = env.observe(spec.num_cells - 1)  # bottom-right corner
    assert (obs[5:, :] == WALL).all() and (obs[:, 5:] == WALL).all()
    np.testing.assert_array_equal(obs[:5, :5], env.grid[-5:, -5:])
    # torch windows at every cell == the numpy environment's
    layout = sample_layouts(1, spec, seed=1)
    w = windows(layout.cells, torch.arange(spec.num_cells)[None], spec.view_radius)[0]
    for cell in range(spec.num_cells):
        np.testing.assert_array_equal(w[cell].numpy(), env.observe(cell))


def test_layouts_deterministic_and_well_formed():
    spec = GridSpec()
    a = sample_layouts(30, spec, seed=5)
    b = sample_layouts(10, spec, seed=5, offset=20)
    assert torch.equal(a.cells[20:], b.cells) and torch.equal(a.start[20:], b.start)
    assert not torch.equal(sample_layouts(30, spec, seed=6).cells, a.cells)
    flat = a.flat_cells()
    for code, count in ((GOAL, spec.num_goals), (GEM, spec.num_gems), (PIT, spec.num_pits), (MUD, spec.num_mud)):
        assert ((flat == code).sum(1) == count).all()
    assert (flat.gather(1, a.start[:, None]) == EMPTY).all()
    main = a.transformed()
    assert ((main.flat_cells() == GOAL).sum() == 0) and ((main.flat_cells() == GEM).sum(1) == spec.num_gems).all()


def _open_grid(spec_kw) -> tuple[Layouts, GridSpec]:
    return _layout([[EMPTY] * 5 for _ in range(5)], 12, **spec_kw)


def test_noise_rate_statistically():
    """A different move than the chosen one happens 10% of the time (the paper's transition noise),
    each of the 3 other moves a third of that; measured by sampling in both simulators."""
    noise, n = GridSpec().noise, 20_000
    assert noise == 0.1
    layouts, spec = _open_grid(dict(drop=0.0))
    tol = 4.5 * np.sqrt(noise * (1 - noise) / n)
    sim = BatchedGridworld(layouts.repeat(n), generator=torch.Generator().manual_seed(0))
    sim.reset()
    sim.step(torch.full((n,), UP), observe=False)
    moved = sim.position
    assert abs(float((moved != 7).float().mean()) - noise) < tol
    counts = torch.bincount(moved, minlength=25)[[7, 11, 13, 17]].float() / n  # up, left, right, down
    assert abs(float(counts[0]) - (1 - noise)) < tol
    for c in counts[1:]:
        assert abs(float(c) - noise / 3) < tol
    env = GridworldEnv(cells=layouts.cells[0].numpy(), start=12, spec=spec)
    env.reset(seed=0)
    m = 4000
    moves = {7: 0, 11: 0, 13: 0, 17: 0}
    for _ in range(m):
        env.position = 12
        _, _, _, _, info = env.step(UP)
        moves[info["position"]] += 1
    assert abs(1 - moves[7] / m - noise) < 4.5 * np.sqrt(noise * (1 - noise) / m)
    assert min(moves[c] for c in (11, 13, 17)) > 0


@pytest.mark.slow
def test_termination_rate_statistically():
    """Every step ends in the non-rewarding terminal state with probability 0.01: in an all-mud grid
    (reward -0.1 on every move) the ending steps pay 0, the others -0.1; gym episodes are geometric."""
    drop, n = GridSpec().drop, 50_000
    assert drop == 0.01
    layouts, spec = _layout([[MUD] * 5 for _ in range(5)], 12, noise=0.0)
    tol = 4.5 * np.sqrt(drop * (1 - drop) / n)
    sim = BatchedGridworld(layouts.repeat(n), generator=torch.Generator().manual_seed(1))
    sim.reset()
    _, reward, terminated = sim.step(torch.full((n,), UP), observe=False)
    assert abs(float(terminated.float().mean()) - drop) < tol
    assert (reward[terminated] == 0).all() and (reward[~terminated] == spec.reward_mud).all()
    assert (sim.position[terminated] == 12).all() and (sim.position[~terminated] == 7).all()  # no move on the drop
    # gym: episode lengths are geometric with mean 1 / drop, and the last step pays nothing
    env = GridworldEnv(cells=layouts.cells[0].numpy(), start=12, spec=spec)
    env.reset(seed=1)
    lengths = []
    for _ in range(150):
        env.reset()
        steps, done = 0, False
        while not done:
            _, r, done, _, _ = env.step(UP if steps % 2 else DOWN)
            steps += 1
            assert r == (0.0 if done else spec.reward_mud)
        lengths.append(steps)
    lengths = np.array(lengths)
    assert abs(lengths.mean() - 1 / drop) < 4.5 * np.sqrt((1 - drop) / drop**2 / len(lengths))


def test_new_task_removes_the_teachers_rewards_and_their_termination():
    """The cross task: the GOAL cells (the teacher's reward) pay nothing and no longer end the episode,
    in both simulators; the GEMs still do. ``remove="all"`` leaves no positive reward at all."""
    from lightning_gradsim.rl.experiment import main_task

    spec = GridSpec()
    layouts = sample_layouts(40, spec, seed=3)
    goals = layouts.flat_cells() == GOAL
    for remove, gone in (("goal", (GOAL,)), ("all", (GOAL, GEM))):
        task = main_task(layouts, "cross", remove)
        rewards = spec.reward_table()[task.flat_cells()]
        was_gone = torch.zeros_like(goals)
        for code in gone:
            was_gone |= layouts.flat_cells() == code
        assert (task.flat_cells()[was_gone] == EMPTY).all() and (rewards[was_gone] == 0).all()
        assert not GridSpec.terminal_table()[task.flat_cells()[was_gone]].any()
        assert (rewards > 0).any() == (remove == "goal")
    assert main_task(layouts, "same") is layouts
    # step onto a former goal from its neighbours, no noise or drop: reward 0, not terminated
    quiet = GridSpec(noise=0.0, drop=0.0)
    lay = sample_layouts(1, quiet, seed=4)
    goal = int((lay.flat_cells()[0] == GOAL).nonzero())
    nxt = lay.next_cell()[0]
    into = [(c, a) for c in range(quiet.num_cells) for a in range(4) if int(nxt[c, a]) == goal and c != goal]
    assert into
    for task, reward, ends in ((lay.transformed(), 0.0, False), (lay, quiet.reward_goal, True)):
        sim = BatchedGridworld(task.repeat(len(into)))
        sim.reset(positions=torch.tensor([c for c, _ in into]), observe=False)
        _, r, t = sim.step(torch.tensor([a for _, a in into]), observe=False)
        assert (sim.position == goal).all() and (r == reward).all() and (t == ends).all()


def test_observation_window_reaches_four_cells():
    """The agent sees its surroundings up to 4 cells away (a 9x9 window) and nothing further: the
    student's features at a cell change when a cell at distance 4 changes, not at distance 5."""
    from lightning_gradsim.rl.student import cell_features, feature_size

    spec = GridSpec()
    assert spec.view_radius == 4 and feature_size(spec) == 81 * 6 + 1
    base = sample_layouts(1, spec, seed=0)
    centre = 0  # top-left corner: cells (4, 4) and (5, 0) are at Chebyshev distance 4 and 5
    for (r, c), seen in (((4, 4), True), ((0, 4), True), ((5, 0), False), ((0, 5), False)):
        cells = base.cells.clone()
        cells[0, r, c] = WALL if int(cells[0, r, c]) != WALL else EMPTY
        changed = Layouts(cells, base.start, spec)
        diff = (cell_features(changed)[0, centre] != cell_features(base)[0, centre]).any()
        assert bool(diff) == seen, (r, c)


def _gym_episodes(env: GridworldEnv, episodes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    returns, lengths = [], []
    for _ in range(episodes):
        env.reset()
        total, steps, done = 0.0, 0, False
        while not done:
            _, r, done, _, _ = env.step(int(rng.integers(4)))
            total += r
            steps += 1
        returns.append(total)
        lengths.append(steps)
    return np.array(returns), np.array(lengths)


def _batched_episodes(layouts: Layouts, episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    sim = BatchedGridworld(layouts.repeat(episodes), generator=torch.Generator().manual_seed(seed))
    sim.reset()
    g = torch.Generator().manual_seed(seed + 1)
    alive = torch.ones(episodes, dtype=torch.bool)
    returns = torch.zeros(episodes, dtype=torch.float64)
    lengths = torch.zeros(episodes, dtype=torch.long)
    while alive.any():
        _, r, t = sim.step(torch.randint(4, (episodes,), generator=g), observe=False)
        returns += torch.where(alive, r.double(), torch.zeros_like(returns))
        lengths += alive.long()
        alive &= ~t
    return returns.numpy(), lengths.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_batched_matches_gym_in_distribution(index):
    """Same layout seeds: equal layouts, equal observations, and random-policy returns and lengths
    from both simulators agree with each other (two-sample tests) and with the exact model value."""
    spec = GridSpec()
    layouts = sample_layouts(1, spec, seed=11, offset=index).transformed()
    env = GridworldEnv(layout_seed=11, layout_index=index, spec=spec, task="transformed")
    np.testing.assert_array_equal(env.grid, layouts.cells[0].numpy())
    assert env.start == int(layouts.start[0])
    env.reset(seed=index)
    g_ret, g_len = _gym_episodes(env, 400, np.random.default_rng(index))
    b_ret, b_len = _batched_episodes(layouts, 3000, seed=index)
    g_ret, b_ret = g_ret.round(6), b_ret.round(6)  # float32 vs float64 sums of the same rewards
    assert stats.ks_2samp(g_len, b_len).pvalue > 1e-3
    assert stats.ks_2samp(g_ret, b_ret).pvalue > 1e-3
    exact = float(policy_evaluation(layouts, torch.full((1, spec.num_cells, 4), 0.25))[0, layouts.start[0]])
    for ret in (g_ret, b_ret):
        assert abs(ret.mean() - exact) < 4.5 * ret.std() / np.sqrt(len(ret)) + 1e-9


def test_next_cell_distribution_matches_gym():
    """From every free cell of a layout and every action: the batched next-cell frequencies agree
    with the gymnasium environment's (chi-square)."""
    spec = GridSpec(noise=0.3)
    layouts = sample_layouts(1, spec, seed=2)
    env = GridworldEnv(layout_seed=2, spec=spec)
    env.reset(seed=0)
    nxt = layouts.next_cell()[0]
    free = [c for c in range(spec.num_cells) if env.grid.flat[c] in (EMPTY, MUD)][:6]
    reps = 300
    for cell in free:
        for action in range(4):
            gym_counts: dict[int, int] = {}
            for _ in range(reps):
                env.position = cell
                _, _, _, _, info = env.step(action)
                gym_counts[info["position"]] = gym_counts.get(info["position"], 0) + 1
            sim = BatchedGridworld(layouts.repeat(reps), generator=torch.Generator().manual_seed(cell * 4 + action))
            sim.reset(positions=torch.full((reps,), cell), observe=False)
            sim.step(torch.full((reps,), action), observe=False)
            b_counts = torch.bincount(sim.position, minlength=spec.num_cells)
            support = sorted(set(gym_counts) | {int(c) for c in b_counts.nonzero().flatten()})
            assert set(support) <= set(nxt[cell].tolist())
            if len(support) > 1:
                table = np.array([[gym_counts.get(c, 0) for c in support], [int(b_counts[c]) for c in support]])
                assert stats.chi2_contingency(table).pvalue > 1e-4
