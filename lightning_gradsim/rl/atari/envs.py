"""Batched game environments: MinAtar (CPU default) and the Arcade Learning Environment (GPU recipe).

Both step ``N`` games as one batch, reset finished games in the same step (the observation
returned for a finished game is its new episode's first one), and report the undiscounted
return of every episode that ended. ``games`` lists one game per environment, so one batch can
mix games (the multi-task run).

* :class:`MinAtarVectorEnv`: ``minatar.Environment`` games (10x10 binary channels, 6 actions,
  sticky actions with probability 0.1 as in MinAtar's default), stepped in a Python loop.
* :class:`AleVectorEnv`: ``ale_py``'s vectorised ALE with the standard Atari preprocessing
  (84x84 grayscale, max over the last 2 frames, action repeat 4, frame stack 4, up to 30 no-op
  starts, full 18-action set so that games share one policy head). One ``frame`` of the
  experiment is one emulator frame, i.e. 4 per agent step.

Example:

>>> env = MinAtarVectorEnv(["breakout", "breakout"], seeds=[0, 1])
>>> obs = env.reset()
>>> obs.shape, env.num_actions, env.frames_per_step
((2, 4, 10, 10), 6, 1)
>>> step = env.step(np.zeros(2, dtype=np.int64))
>>> step.obs.shape, step.reward.tolist(), step.done.tolist()
((2, 4, 10, 10), [0.0, 0.0], [False, False])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["MINATAR_GAMES", "ALE_GAMES", "Step", "MinAtarVectorEnv", "AleVectorEnv", "make_vector_env"]

#: MinAtar games and their number of observation channels.
MINATAR_GAMES: dict[str, int] = {"breakout": 4, "asterix": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}
#: ALE games this experiment names (any ROM that ``ale_py`` ships works).
ALE_GAMES: tuple[str, ...] = ("breakout", "ms_pacman")


def _checked_games(games: Sequence[str], seeds: Sequence[int]) -> list[str]:
    games = list(games)
    if len(games) != len(seeds) or not games:
        raise ValueError(f"Give one seed per game: {len(seeds)} seeds for {len(games)} games.")
    return games


class Step(NamedTuple):
    """One batched step. ``episode_return`` is NaN where no episode ended."""

    obs: np.ndarray  #: [N, *obs_shape] (after the reset of finished games)
    reward: np.ndarray  #: [N] float32, unclipped
    done: np.ndarray  #: [N] bool: the episode ended at this step (terminal or time limit)
    episode_return: np.ndarray  #: [N] float64


class MinAtarVectorEnv:
    """``N`` MinAtar games stepped as one batch (observations ``[N, C, 10, 10]`` float32).

    Args:
        games: one MinAtar game name per environment (all with the same channel count).
        seeds: one seed per environment.
        sticky_action_prob: MinAtar's sticky-action probability (its default 0.1).
        max_episode_steps: episodes are cut (``done``) after this many steps.
    """

    frames_per_step = 1

    def __init__(
        self,
        games: Sequence[str],
        seeds: Sequence[int],
        sticky_action_prob: float = 0.1,
        max_episode_steps: int = 10_000,
    ) -> None:
        try:
            from minatar import Environment
        except ImportError as err:  # pragma: no cover - exercised without the extra
            raise ImportError("The MinAtar backend needs minatar: pip install 'lightning-gradsim[atari]'.") from err
        games = _checked_games(games, seeds)
        unknown = sorted({g for g in games if g not in MINATAR_GAMES})
        if unknown:
            raise ValueError(f"Unknown MinAtar games {unknown}; choose from {', '.join(MINATAR_GAMES)}.")
        channels = {MINATAR_GAMES[g] for g in games}
        if len(channels) > 1:
            same = [g for g in MINATAR_GAMES if MINATAR_GAMES[g] == MINATAR_GAMES[games[0]]]
            raise ValueError(
                f"MinAtar games {sorted(set(games))} have different channel counts "
                f"({ {g: MINATAR_GAMES[g] for g in sorted(set(games))} }), so one network cannot read them all; "
                f"combine games with {MINATAR_GAMES[games[0]]} channels: {', '.join(same)}."
            )
        self.games = games
        self.envs = []
        for game, seed in zip(games, seeds):
            env = Environment(game, sticky_action_prob=sticky_action_prob)
            env.seed(int(seed))
            self.envs.append(env)
        self.num_envs = len(games)
        self.num_actions = 6
        self.obs_shape = (channels.pop(), 10, 10)
        self.max_episode_steps = int(max_episode_steps)
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)

    def _obs(self) -> np.ndarray:
        return np.stack([e.state() for e in self.envs]).transpose(0, 3, 1, 2).astype(np.float32)

    def reset(self) -> np.ndarray:
        """Start a new episode in every game; returns the observations."""
        for e in self.envs:
            e.reset()
        self._returns[:] = 0.0
        self._lengths[:] = 0
        return self._obs()

    def step(self, actions: np.ndarray) -> Step:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"Expected {self.num_envs} actions, got shape {actions.shape}.")
        reward = np.zeros(self.num_envs, dtype=np.float32)
        done = np.zeros(self.num_envs, dtype=bool)
        for i, (env, a) in enumerate(zip(self.envs, actions.tolist())):
            r, terminal = env.act(a)
            reward[i] = r
            done[i] = terminal
        self._returns += reward
        self._lengths += 1
        done |= self._lengths >= self.max_episode_steps
        episode_return = np.where(done, self._returns, np.nan)
        for j in np.flatnonzero(done):
            self.envs[j].reset()
        self._returns[done] = 0.0
        self._lengths[done] = 0
        return Step(self._obs(), reward, done, episode_return)


class AleVectorEnv:
    """``N`` ALE games with the standard Atari preprocessing (observations ``[N, 4, 84, 84]`` uint8).

    One ``ale_py.vector_env.AtariVectorEnv`` per distinct game; environments keep the order of
    ``games``. Rewards are returned unclipped (the learner clips them).

    Args:
        games: one ROM name per environment (e.g. ``"breakout"``, ``"ms_pacman"``).
        seeds: one seed per environment.
        num_threads: ALE worker threads (0: one per core).
        max_episode_frames: emulator frames after which an episode is cut (108,000 = 30 minutes).
    """

    frames_per_step = 4

    def __init__(
        self, games: Sequence[str], seeds: Sequence[int], num_threads: int = 0, max_episode_frames: int = 108_000
    ) -> None:
        try:
            from ale_py.vector_env import AtariVectorEnv
            from gymnasium.vector import AutoresetMode
        except ImportError as err:  # pragma: no cover - exercised without the extra
            raise ImportError(
                "The ALE backend needs ale-py and gymnasium: pip install 'lightning-gradsim[ale]'."
            ) from err
        games = _checked_games(games, seeds)
        self.games = games
        self.groups: list[tuple[np.ndarray, object, np.ndarray]] = []
        for game in dict.fromkeys(games):
            idx = np.array([i for i, g in enumerate(games) if g == game])
            env = AtariVectorEnv(
                game,
                len(idx),
                num_threads=num_threads,
                full_action_space=True,
                reward_clipping=False,
                repeat_action_probability=0.0,
                noop_max=30,
                frameskip=4,
                stack_num=4,
                img_height=84,
                img_width=84,
                grayscale=True,
                maxpool=True,
                episodic_life=False,
                max_num_frames_per_episode=max_episode_frames,
                autoreset_mode=AutoresetMode.SAME_STEP,
            )
            self.groups.append((idx, env, np.asarray(seeds)[idx]))
        self.num_envs = len(games)
        self.num_actions = 18
        self.obs_shape = (4, 84, 84)
        self._returns = np.zeros(self.num_envs)

    def reset(self) -> np.ndarray:
        obs = np.zeros((self.num_envs, *self.obs_shape), dtype=np.uint8)
        for idx, env, seeds in self.groups:
            o, _ = env.reset(seed=seeds.astype(np.int64))  # type: ignore[attr-defined]
            obs[idx] = o
        self._returns[:] = 0.0
        return obs

    def step(self, actions: np.ndarray) -> Step:
        actions = np.asarray(actions, dtype=np.int64)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"Expected {self.num_envs} actions, got shape {actions.shape}.")
        obs = np.zeros((self.num_envs, *self.obs_shape), dtype=np.uint8)
        reward = np.zeros(self.num_envs, dtype=np.float32)
        done = np.zeros(self.num_envs, dtype=bool)
        for idx, env, _ in self.groups:
            o, r, term, trunc, _ = env.step(actions[idx])  # type: ignore[attr-defined]
            obs[idx], reward[idx], done[idx] = o, r, term | trunc
        self._returns += reward
        episode_return = np.where(done, self._returns, np.nan)
        self._returns[done] = 0.0
        return Step(obs, reward, done, episode_return)

    def close(self) -> None:
        for _, env, _ in self.groups:
            env.close()  # type: ignore[attr-defined]


def make_vector_env(backend: str, games: Sequence[str], seeds: Sequence[int]) -> MinAtarVectorEnv | AleVectorEnv:
    """``"minatar"`` or ``"ale"`` batched environments for ``games`` (one per environment)."""
    if backend == "minatar":
        return MinAtarVectorEnv(games, seeds)
    if backend == "ale":
        return AleVectorEnv(games, seeds)
    raise ValueError(f"Unknown backend {backend!r}; choose 'minatar' or 'ale'.")
