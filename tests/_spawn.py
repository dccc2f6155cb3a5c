"""Real multi-process tests without Lightning: spawn ``world`` processes, each saves what it found, the
test reads it back. Torch only, so a spawned rank imports nothing it does not need."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_rank(out: str | Path, rank: int, result: Any) -> None:
    """What one rank found, for :func:`spawn_ranks` to return."""
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def spawn_ranks(worker: Callable[..., None], world: int, out: str | Path, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, port, out, *args)`` on ``world`` spawned processes (a free port) and return
    what each saved with :func:`save_rank`, in rank order."""
    mp.spawn(worker, args=(world, free_port(), str(out), *args), nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
