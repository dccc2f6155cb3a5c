"""The Atari distillation experiment (paper 4.4): every method and seed trained together.

Each run (method, seed) is one member of a :class:`StackedActorCritic` with its own ``envs``
games (seeded by the seed only, so all methods of a seed start from the same weights and games);
the :class:`BatchedLearner` updates all of them from one batch of unrolls. With several games
(``games=("breakout", "asterix")``) every run plays all of them, ``envs / len(games)`` each.

Example::

    result = run_experiment(AtariConfig(frames=200_000, seeds=2))
    write_curves(result, "runs/atari/curves.csv")
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .envs import make_vector_env
from .learner import METHODS, BatchedLearner, LearnerConfig, Rollout
from .nets import StackedActorCritic
from .plots import nanmean
from .teacher import default_teacher_path, evaluate_policy, load_teacher

__all__ = ["AtariConfig", "AtariResult", "run_experiment", "write_curves", "CURVE_COLUMNS"]

CURVE_COLUMNS = ("method", "seed", "frames", "game", "mean_return", "cosine", "aux_weight", "gate_cosine")
ARCH = {"minatar": "minatar", "ale": "nature"}


@dataclass
class AtariConfig:
    """Settings of :func:`run_experiment` (defaults: ``gradsim atari``'s).

    Args:
        games: the main task's games (one: Figure 5; two: Figure 6).
        backend: ``"minatar"`` (CPU) or ``"ale"`` (full Atari, GPU recipe).
        frames: training frames per run (emulator frames: MinAtar steps, or 4 per ALE step), rounded
            up to whole updates of ``unroll * envs`` steps.
        seeds: seeds per method; ``seed_offset`` is added to each.
        methods: a subset of :data:`~lightning_gradsim.rl.atari.learner.METHODS`.
        envs: games per run (the batch size of one unroll).
        unroll: unroll length ``T`` (the V-trace n-step horizon).
        log_every: frames per run between two curve points (0: ``frames / 40``).
        teacher: teacher checkpoint (``None``: the package's for the backend).
        random_episodes: episodes of the uniformly random policy measured per game for the plots (0: none).
        learner: learner hyper-parameters.
        device: torch device of the networks.
    """

    games: tuple[str, ...] = ("breakout",)
    backend: str = "minatar"
    frames: int = 300_000
    seeds: int = 3
    seed_offset: int = 0
    methods: tuple[str, ...] = METHODS
    envs: int = 16
    unroll: int = 20
    log_every: int = 0
    teacher: str | None = None
    random_episodes: int = 32
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.games, self.methods = tuple(self.games), tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Unknown or no methods {list(self.methods)}; choose from {', '.join(METHODS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"Methods repeat: {list(self.methods)}.")
        if not self.games or len(set(self.games)) != len(self.games):
            raise ValueError(f"Give distinct games, got {list(self.games)}.")
        if self.backend not in ARCH:
            raise ValueError(f"Unknown backend {self.backend!r}; choose from {', '.join(ARCH)}.")
        if self.frames < 1 or self.seeds < 1 or self.unroll < 1 or self.log_every < 0:
            raise ValueError("frames, seeds and unroll must be >= 1 and log_every >= 0.")
        if self.envs < len(self.games) or self.envs % len(self.games):
            raise ValueError(
                f"envs ({self.envs}) must be a positive multiple of the number of games ({len(self.games)})."
            )

    @property
    def runs(self) -> list[tuple[str, int]]:
        """``(method, seed)`` of every member, method-major."""
        return [(m, self.seed_offset + s) for m in self.methods for s in range(self.seeds)]


@dataclass
class AtariResult:
    """What :func:`run_experiment` measured.

    Attributes:
        curves: rows of :data:`CURVE_COLUMNS`; ``mean_return`` is the mean return of the training
            episodes that ended in the window before ``frames`` (NaN if none), ``cosine`` the mean over
            the window of the smoothed per-layer cosine between the KL gradient and that game's RL
            gradient, ``gate_cosine`` the same against the whole RL gradient (what the gate reads),
            ``aux_weight`` the mean weight applied to the KL gradient.
        teacher_info: the teacher checkpoint's metadata (empty without a teacher).
        random_return: game -> mean return of the uniformly random policy.
        seconds: wall time of the training loop; ``frames_total``: frames of all runs together.
        net: the trained networks (member ``i`` is run ``config.runs[i]``).
    """

    config: AtariConfig
    curves: list[tuple]
    teacher_info: dict
    random_return: dict[str, float]
    seconds: float = 0.0
    frames_total: int = 0
    net: StackedActorCritic | None = field(default=None, repr=False)  #: the trained runs, one member each

    @property
    def fps(self) -> float:
        return self.frames_total / self.seconds if self.seconds > 0 else float("nan")

    def summary(self, tail: float = 0.2) -> dict[tuple[str, str], dict[str, float]]:
        """``(method, game) ->`` mean over seeds of the last ``tail`` fraction of the curve, and the
        frames at which the seed-mean curve first reaches the teacher's return (``inf`` if never)."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        teacher = self.teacher_info.get("eval_return", float("nan"))
        for method in self.config.methods:
            for game in self.config.games:
                rows = [r for r in self.curves if r[0] == method and r[3] == game]
                frames = sorted({r[2] for r in rows})
                mean_curve = [nanmean([r[4] for r in rows if r[2] == f]) for f in frames]
                cut = frames[-1] * (1 - tail)
                late = [r for r in rows if r[2] > cut]
                reach = next((f for f, v in zip(frames, mean_curve) if v >= teacher), math.inf)
                out[(method, game)] = {
                    "final_return": float(nanmean([r[4] for r in late])),
                    "final_weight": float(nanmean([r[6] for r in late])),
                    "early_return": float(nanmean(mean_curve[: max(1, len(mean_curve) // 4)])),
                    "frames_to_teacher": float(reach),
                }
        return out


def _split_games(cfg: AtariConfig) -> list[str]:
    per = cfg.envs // len(cfg.games)
    return [g for g in cfg.games for _ in range(per)]


def run_experiment(cfg: AtariConfig, progress: Callable[[int], None] | None = None) -> AtariResult:
    """Train every (method, seed) run; ``progress(frames)`` is called after each update."""
    import time

    device = torch.device(cfg.device)
    runs = cfg.runs
    m, n, t_len = len(runs), cfg.envs, cfg.unroll
    env_games = _split_games(cfg)
    game_index = torch.tensor([cfg.games.index(g) for g in env_games], device=device)
    seeds = [s for _, s in runs]
    env = make_vector_env(cfg.backend, env_games * m, [s * 100_003 + 17 * i + 1 for s in seeds for i in range(n)])
    teacher: StackedActorCritic | None = None
    info: dict[str, Any] = {}
    if any(meth != "rl" for meth in cfg.methods):
        teacher, info = load_teacher(cfg.teacher or default_teacher_path(cfg.backend), device=device)
    net = StackedActorCritic(m, env.obs_shape, env.num_actions, arch=ARCH[cfg.backend], seeds=seeds).to(device)
    lcfg = cfg.learner
    learner = BatchedLearner(net, [meth for meth, _ in runs], teacher, lcfg, num_games=len(cfg.games))
    random_return = {
        g: evaluate_policy(None, cfg.backend, g, episodes=cfg.random_episodes, seed=12345, num_actions=env.num_actions)[
            0
        ]
        for g in cfg.games
        if cfg.random_episodes > 0
    }
    frames_per_update = t_len * n * env.frames_per_step
    updates = max(1, math.ceil(cfg.frames / frames_per_update))
    log_every = cfg.log_every or max(frames_per_update, cfg.frames // 40)
    gen = torch.Generator().manual_seed(cfg.seed_offset * 7919 + 11)
    obs = torch.as_tensor(env.reset()).view(m, n, *env.obs_shape)
    obs_buf = torch.zeros((t_len + 1, m, n, *env.obs_shape), dtype=obs.dtype)
    act_buf = torch.zeros((t_len, m, n), dtype=torch.long)
    logit_buf = torch.zeros((t_len, m, n, env.num_actions))
    rew_buf = torch.zeros((t_len, m, n))
    done_buf = torch.zeros((t_len, m, n), dtype=torch.bool)
    g_count = len(cfg.games)
    game_np = game_index.cpu().numpy()
    # Window sums per (member, game): episode returns, episode count; per member: cosine, weight, updates.
    ret_sum, ret_cnt = np.zeros((m, g_count)), np.zeros((m, g_count))
    stat_sum = torch.zeros(m, 2 + g_count, device=device)
    stat_cnt = 0
    curves: list[tuple] = []
    next_log, frames_done = log_every, 0
    start = time.perf_counter()
    for _ in range(updates):
        obs_buf[0] = obs
        for t in range(t_len):
            with torch.no_grad():
                logits, _ = net(obs.to(device))
            logits = logits.float().cpu()
            actions = torch.multinomial(torch.softmax(logits.reshape(m * n, -1), -1), 1, generator=gen).view(m, n)
            step = env.step(actions.reshape(-1).numpy())
            obs = torch.as_tensor(step.obs).view(m, n, *env.obs_shape)
            obs_buf[t + 1], act_buf[t], logit_buf[t] = obs, actions, logits
            rew_buf[t] = torch.as_tensor(step.reward).view(m, n)
            done_buf[t] = torch.as_tensor(step.done).view(m, n)
            if step.done.any():
                ended = step.done.reshape(m, n)
                rets = step.episode_return.reshape(m, n)
                for mi, ni in zip(*np.nonzero(ended)):
                    ret_sum[mi, game_np[ni]] += rets[mi, ni]
                    ret_cnt[mi, game_np[ni]] += 1
        batch = Rollout(
            obs_buf.to(device),
            act_buf.to(device),
            logit_buf.to(device),
            rew_buf.to(device),
            done_buf.to(device),
            game_index,
        )
        stats = learner.update(batch)
        stat_sum += torch.cat([stats.cosine[:, None], stats.aux_weight[:, None], stats.game_cosine], 1)
        stat_cnt += 1
        frames_done += frames_per_update
        if progress is not None:
            progress(frames_per_update)
        if frames_done >= next_log or frames_done >= cfg.frames:
            s = (stat_sum / max(stat_cnt, 1)).cpu().numpy()
            with np.errstate(invalid="ignore"):
                mean_ret = ret_sum / ret_cnt
            for mi, (meth, seed) in enumerate(runs):
                for gi, game in enumerate(cfg.games):
                    curves.append(
                        (
                            meth,
                            seed,
                            frames_done,
                            game,
                            float(mean_ret[mi, gi]),
                            float(s[mi, 2 + gi]),
                            float(s[mi, 1]),
                            float(s[mi, 0]),
                        )
                    )
            ret_sum[:], ret_cnt[:] = 0.0, 0.0
            stat_sum.zero_()
            stat_cnt = 0
            next_log += log_every
    seconds = time.perf_counter() - start
    if hasattr(env, "close"):
        env.close()
    total = frames_done * m
    return AtariResult(cfg, curves, info, random_return, seconds, total, net)


def write_curves(result: AtariResult, path: str | os.PathLike) -> Path:
    """Write ``result.curves`` as CSV (columns :data:`CURVE_COLUMNS`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for meth, seed, frames, game, ret, cos, weight, gcos in result.curves:
            w.writerow([meth, seed, frames, game, f"{ret:.4f}", f"{cos:.5f}", f"{weight:.5f}", f"{gcos:.5f}"])
    return path


def config_dict(cfg: AtariConfig) -> dict:
    """The config as plain data (for ``config.json``)."""
    return asdict(cfg)
