"""Many independent MLP runs trained as one stacked model: the engine of ``gradsim table1``.

``R`` runs (seeds x methods x angles) of the same shape -- a ReLU trunk shared by ``T`` tasks, one
linear head per task -- keep their parameters with a leading run dimension. One step takes every
run's batch of every task, ``x`` of shape ``(R, T, B, D)``, through batched matmuls
(``torch.baddbmm``): the tasks' rows are concatenated in one matmul per layer, and the backward
pass, written out by hand, takes the weight gradients per task block. So a single pass gives
every run's *per-task* gradients on the trunk (runs and tasks are independent), which a
:class:`~lightning_gradsim.GradientGate` per method then combines, run by run, with
``gate.combine(main, {"rotated": aux}, batch_dims=1)``. RMSprop is elementwise, so one
``torch.optim.RMSprop`` over the stacked parameters is exactly one RMSprop per run.

Every run is initialised like ``torch.nn.Linear`` (weights and biases uniform in
``+-1/sqrt(fan_in)``) from a generator seeded with its seed: runs with the same seed start from
the same parameters whatever their method (a paired design).

Example:

>>> model = StackedMLP(seeds=[0, 1, 0], input_dim=4, hidden=5, depth=2, num_tasks=2)
>>> x, y = torch.rand(3, 2, 6, 4), torch.randint(0, 10, (3, 2, 6))
>>> grads = model.task_gradients(x, y)
>>> tuple(grads.trunk[0].shape), tuple(grads.loss.shape)
((3, 2, 4, 5), (3, 2))
>>> bool(torch.equal(model.trunk[0][0], model.trunk[0][2]))   # same seed, same start
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["StackedMLP", "TaskGradients", "init_run_parameters"]


def init_run_parameters(
    seed: int, input_dim: int, hidden: int = 100, depth: int = 3, num_classes: int = 10, num_tasks: int = 2
) -> list[tuple[Tensor, Tensor]]:
    """One run's ``(weight (out, in), bias (out,))`` per layer: trunk layers, then one head per task.

    Drawn like ``torch.nn.Linear``'s default (uniform in ``+-1/sqrt(in)``) from ``Generator(seed)``,
    in ``nn.Linear``'s layout, so a plain ``nn.Sequential`` can load them (the tests do).

    >>> [tuple(w.shape) for w, _ in init_run_parameters(0, 64, hidden=100, depth=3)]
    [(100, 64), (100, 100), (100, 100), (10, 100), (10, 100)]
    """
    g = torch.Generator().manual_seed(int(seed))
    dims = [input_dim] + [hidden] * depth
    shapes = [(dims[i + 1], dims[i]) for i in range(depth)] + [(num_classes, hidden)] * num_tasks
    out = []
    for fan_out, fan_in in shapes:
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
        out.append((w, b))
    return out


class TaskGradients(NamedTuple):
    """Per-run, per-task gradients of one step (no autograd graph)."""

    #: trunk ``[W_1, b_1, ..., W_depth, b_depth]``, shapes ``(R, T, in, out)`` and ``(R, T, out)``.
    trunk: list[Tensor]
    #: heads ``[W, b]``, shapes ``(R, T, hidden, C)`` and ``(R, T, C)``: task t's gradient of head t.
    heads: list[Tensor]
    #: ``(R, T)`` mean cross-entropy of each run's batch of each task.
    loss: Tensor


class StackedMLP:
    """``R`` independent ReLU MLPs (``depth`` x ``hidden`` trunk, ``num_tasks`` linear heads).

    Attributes:
        trunk: ``[W_1, b_1, ...]`` leaf tensors, ``W_l`` ``(R, in, out)`` and ``b_l`` ``(R, out)``.
        heads: ``[W, b]`` leaf tensors ``(R, T, hidden, C)`` and ``(R, T, C)``.

    The tensors require grad only so that ``torch.optim`` accepts them; forward and backward are
    computed by hand under ``torch.no_grad()``.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        input_dim: int,
        hidden: int = 100,
        depth: int = 3,
        num_classes: int = 10,
        num_tasks: int = 2,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if depth < 1 or hidden < 1 or num_tasks < 1 or not seeds:
            raise ValueError(
                "Need depth, hidden, num_tasks >= 1 and at least one seed; "
                f"got {depth}, {hidden}, {num_tasks}, {list(seeds)}."
            )
        self.num_runs, self.num_tasks, self.depth = len(seeds), num_tasks, depth
        #: each run's seed (its initialisation, data order and, in a gate, its random draws)
        self.seeds = [int(s) for s in seeds]
        self.input_dim, self.hidden, self.num_classes = input_dim, hidden, num_classes
        cache: dict[int, list[tuple[Tensor, Tensor]]] = {}
        per_run = []
        for s in seeds:
            if int(s) not in cache:
                cache[int(s)] = init_run_parameters(int(s), input_dim, hidden, depth, num_classes, num_tasks)
            per_run.append(cache[int(s)])
        self.trunk: list[Tensor] = []
        for layer in range(depth):
            w = torch.stack([p[layer][0].T for p in per_run])
            b = torch.stack([p[layer][1] for p in per_run])
            self.trunk += [w.to(device, dtype).contiguous(), b.to(device, dtype).contiguous()]
        heads = [[p[depth + t] for t in range(num_tasks)] for p in per_run]
        hw = torch.stack([torch.stack([w.T for w, _ in h]) for h in heads])
        hb = torch.stack([torch.stack([b for _, b in h]) for h in heads])
        self.heads: list[Tensor] = [hw.to(device, dtype).contiguous(), hb.to(device, dtype).contiguous()]
        for p in self.parameters():
            p.requires_grad_(True)
        self._workspace: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def parameters(self) -> list[Tensor]:
        """Trunk then head tensors (give them to one optimizer)."""
        return self.trunk + self.heads

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A work buffer reused across steps (fresh large allocations cost page faults on the CPU)."""
        key = (name, tuple(shape))
        out = self._workspace.get(key)
        if out is None or out.dtype != like.dtype or out.device != like.device:
            out = self._workspace[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return out

    @torch.no_grad()
    def task_gradients(self, x: Tensor, y: Tensor) -> TaskGradients:
        """Every run's per-task gradients for inputs ``x`` ``(R, T, B, D)`` and labels ``y`` ``(R, T, B)``.

        The returned tensors are work buffers that the next call overwrites: use (or copy) them first.
        """
        r, t, b, d = x.shape
        if (r, t, d) != (self.num_runs, self.num_tasks, self.input_dim) or tuple(y.shape) != (r, t, b):
            raise ValueError(
                f"x must be (runs={self.num_runs}, tasks={self.num_tasks}, batch, {self.input_dim}) "
                "and y (runs, tasks, batch); "
                f"got {tuple(x.shape)} and {tuple(y.shape)}."
            )
        rt, hid = r * t, self.hidden
        buf = self._buffer
        acts = [x.reshape(r, t * b, d)]
        for layer in range(self.depth):
            w, bias = self.trunk[2 * layer], self.trunk[2 * layer + 1]
            z = torch.bmm(acts[-1], w, out=buf(f"act{layer}", (r, t * b, w.shape[-1]), x))
            acts.append(z.add_(bias.unsqueeze(1)).clamp_min_(0.0))  # bmm + add_: cheaper than baddbmm on CPU
        hw, hb = self.heads[0].reshape(rt, hid, -1), self.heads[1].reshape(rt, 1, -1)
        feats = acts[-1].view(rt, b, hid)
        logits = torch.bmm(feats, hw, out=buf("logits", (rt, b, hw.shape[-1]), x)).add_(hb)
        logp = logits.sub_(logits.logsumexp(-1, keepdim=True))  # log-softmax in place
        target = y.reshape(rt, b, 1)
        loss = -logp.gather(-1, target).mean((1, 2)).view(r, t)
        # d(mean CE)/d logits = (softmax - onehot) / B
        dlogits = logp.exp_().scatter_add_(-1, target, torch.full_like(target, -1, dtype=logp.dtype)).div_(b)
        heads = [
            torch.bmm(feats.transpose(1, 2), dlogits, out=buf("head_w", (rt, hid, hw.shape[-1]), x)).view(
                r, t, hid, -1
            ),
            torch.sum(dlogits, 1, out=buf("head_b", (rt, hw.shape[-1]), x)).view(r, t, -1),
        ]
        dh = torch.bmm(dlogits, hw.transpose(1, 2), out=buf(f"dh{self.depth}", (rt, b, hid), x)).view(r, t * b, hid)
        trunk: list[Tensor] = [torch.empty(0)] * (2 * self.depth)
        for layer in reversed(range(self.depth)):
            # dz = dh * (relu output > 0), written over dh
            dz = torch.ops.aten.threshold_backward.grad_input(dh, acts[layer + 1], 0.0, grad_input=dh)
            prev = acts[layer]
            width, out = prev.shape[-1], dz.shape[-1]
            gw = buf(f"grad_w{layer}", (rt, width, out), x)
            trunk[2 * layer] = torch.bmm(prev.view(rt, b, width).transpose(1, 2), dz.view(rt, b, out), out=gw).view(
                r, t, width, out
            )
            trunk[2 * layer + 1] = torch.sum(dz.view(r, t, b, out), 2, out=buf(f"grad_b{layer}", (r, t, out), x))
            if layer > 0:
                dh = torch.bmm(dz, self.trunk[2 * layer].transpose(1, 2), out=buf(f"dh{layer}", (r, t * b, width), x))
        return TaskGradients(trunk, heads, loss)

    def head_trunk_gradient(self, x: Tensor, y: Tensor, runs: slice, task: int = 0) -> list[Tensor]:
        """The trunk gradient of head ``task``'s mean cross-entropy for the runs ``runs`` (a slice),
        inputs ``x`` ``(R', B, D)``, labels ``y`` ``(R', B)``: ``[W_1, b_1, ...]`` shaped like the trunk's
        slice. Fresh tensors (autograd on detached copies); nothing is written to the parameters.

        Used for the held-out reference gradient (the main head on a held-out batch).
        """
        with torch.enable_grad():
            trunk = [p.detach()[runs].requires_grad_() for p in self.trunk]
            h = x
            for layer in range(self.depth):
                h = torch.baddbmm(trunk[2 * layer + 1].unsqueeze(1), h, trunk[2 * layer]).clamp_min(0.0)
            logits = torch.baddbmm(
                self.heads[1].detach()[runs, task].unsqueeze(1), h, self.heads[0].detach()[runs, task]
            )
            per_run = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.long(), reduction="none").mean(1)
            return list(torch.autograd.grad(per_run.sum(), trunk))

    @torch.no_grad()
    def logits(self, x: Tensor, task: int = 0, chunk: int = 1024) -> Tensor:
        """``(R, N, C)`` logits of head ``task`` for inputs ``x`` ``(N, D)`` shared by every run."""
        outs = []
        for start in range(0, x.shape[0], chunk):
            h = x[start : start + chunk].unsqueeze(0).expand(self.num_runs, -1, -1)
            for layer in range(self.depth):
                h = torch.baddbmm(self.trunk[2 * layer + 1].unsqueeze(1), h, self.trunk[2 * layer]).clamp_min_(0.0)
            outs.append(torch.baddbmm(self.heads[1][:, task].unsqueeze(1), h, self.heads[0][:, task]))
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def error(self, x: Tensor, y: Tensor, task: int = 0) -> Tensor:
        """``(R,)`` classification error of head ``task`` on ``x`` ``(N, D)``, labels ``y`` ``(N,)``."""
        wrong = torch.zeros(self.num_runs, device=x.device)
        chunk = 256  # test images per matmul: fixed, so a run's logits do not depend on how many runs there are
        for start in range(0, x.shape[0], chunk):
            pred = self.logits(x[start : start + chunk], task, chunk).argmax(-1)
            wrong += (pred != y[start : start + chunk].unsqueeze(0)).sum(1)
        return wrong / x.shape[0]

    def finite(self) -> Tensor:
        """``(R,)`` bool: whether every parameter of each run is finite."""
        ok = torch.ones(self.num_runs, dtype=torch.bool, device=self.trunk[0].device)
        for p in self.parameters():
            ok &= torch.isfinite(p.detach()).flatten(1).all(1)
        return ok
