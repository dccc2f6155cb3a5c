"""The sub-optimal teacher: a checkpoint of the same agent, trained on Breakout and stopped early.

A checkpoint is a ``torch.save`` of a plain dict (loaded with ``weights_only=True``):
``state_dict`` (one member, float16), ``arch``, ``in_shape``, ``num_actions``, ``backend``,
``game``, ``frames`` (training frames), ``train_return`` (mean return of the last training
episodes), ``eval_return`` / ``eval_episodes`` (its sampled policy, evaluated after training)
and ``command`` (how it was made). :data:`DEFAULT_TEACHERS` ships with the package.

Example:

>>> teacher, info = load_teacher(default_teacher_path("minatar"))
>>> teacher.members, teacher.in_shape, info["game"]
(1, (4, 10, 10), 'breakout')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .envs import make_vector_env
from .nets import StackedActorCritic

__all__ = ["DEFAULT_TEACHERS", "default_teacher_path", "save_teacher", "load_teacher", "evaluate_policy"]

_DIR = Path(__file__).resolve().parent / "teachers"
#: backend -> packaged teacher file name (the ALE teacher is not shipped: train it on a GPU).
DEFAULT_TEACHERS: dict[str, str] = {"minatar": "breakout_minatar.pt"}


def default_teacher_path(backend: str) -> Path:
    """The packaged teacher of ``backend``; a clear error where none is shipped."""
    if backend not in DEFAULT_TEACHERS:
        raise ValueError(
            f"No teacher is shipped for the {backend!r} backend. Train one first, e.g. "
            f"`gradsim atari teacher --backend {backend} --frames 10000000 --out teacher.pt`, "
            "then pass --teacher teacher.pt."
        )
    return _DIR / DEFAULT_TEACHERS[backend]


def save_teacher(net: StackedActorCritic, member: int, path: str | os.PathLike, **info: Any) -> Path:
    """Save one member of ``net`` (float16) with ``info`` (plain numbers and strings) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in net.member_state(member).items()}
    payload = {
        "state_dict": state,
        "arch": net.arch,
        "in_shape": list(net.in_shape),
        "num_actions": net.num_actions,
        **info,
    }
    torch.save(payload, path)
    return path


def load_teacher(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[StackedActorCritic, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_teacher`: a one-member network (eval mode) and its info."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Teacher checkpoint {path} not found; create one with `gradsim atari teacher`.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("state_dict", "arch", "in_shape", "num_actions") if k not in payload]
    if missing:
        raise ValueError(
            f"{path} is not a teacher checkpoint (missing {missing}); create one with `gradsim atari teacher`."
        )
    net = StackedActorCritic(1, payload["in_shape"], payload["num_actions"], arch=payload["arch"])
    net.load_member_state({k: v.float() for k, v in payload["state_dict"].items()})
    net.requires_grad_(False)
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return net.to(device).eval(), info


@torch.no_grad()
def evaluate_policy(
    net: StackedActorCritic | None,
    backend: str,
    game: str,
    episodes: int,
    seed: int,
    envs: int = 8,
    max_steps: int = 100_000,
    num_actions: int | None = None,
) -> tuple[float, int]:
    """Mean return of ``net``'s sampled policy (member 0; ``None``: uniformly random) over ``episodes``.

    Runs ``envs`` games at once until ``episodes`` episodes ended (or ``max_steps`` batched steps);
    returns ``(mean_return, episodes_counted)``.
    """
    env = make_vector_env(backend, [game] * envs, [seed * 1000 + i for i in range(envs)])
    obs = env.reset()
    gen = torch.Generator().manual_seed(seed)
    returns: list[float] = []
    device = net.fc_weight.device if net is not None else torch.device("cpu")
    actions_n = num_actions or env.num_actions
    for _ in range(max_steps):
        if net is None:
            actions = torch.randint(actions_n, (envs,), generator=gen)
        else:
            logits, _ = net(torch.as_tensor(obs, device=device).unsqueeze(0))
            actions = torch.multinomial(torch.softmax(logits[0].cpu(), -1), 1, generator=gen).squeeze(1)
        step = env.step(actions.numpy())
        obs = step.obs
        returns += step.episode_return[step.done].tolist()
        if len(returns) >= episodes:
            break
    if hasattr(env, "close"):
        env.close()
    returns = returns[:episodes]
    return (float(np.mean(returns)) if returns else float("nan")), len(returns)
