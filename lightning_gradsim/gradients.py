"""Getting per-task gradients: the only part of the gate that runs autograd.

The gate needs, for every task ``k``, its gradient on each shared parameter (kept separate), and
for every other parameter (task heads) the sum over tasks of their gradients, which is exactly
what plain ``backward`` of each task's own loss gives a head.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["TaskGradients", "task_gradients", "reachable_parameters"]


class TaskGradients:
    """Per-task gradients on the shared parameters and summed gradients on the other ones.

    Attributes:
        shared: one entry per shared parameter: a ``(K, *param.shape)`` tensor (row ``k`` is task
            ``k``'s gradient, zeros where a task does not reach the parameter), or ``None`` when no
            task reaches the parameter.
        others: one entry per other parameter: the sum over tasks of their gradients, or ``None``.
        reached: one entry per task: whether its loss reaches any shared parameter.
    """

    __slots__ = ("shared", "others", "reached")

    def __init__(self, shared: list[Tensor | None], others: list[Tensor | None], reached: list[bool]) -> None:
        self.shared = shared
        self.others = others
        self.reached = reached


def task_gradients(losses: Sequence[Tensor], shared: Sequence[Tensor], others: Sequence[Tensor]) -> TaskGradients:
    """Per-task gradients of ``losses`` on ``shared``, summed gradients on ``others``.

    One ``torch.autograd.grad`` call per task (the graph is retained until the last one). When
    the tasks' graphs are disjoint (separate batches) this costs exactly one plain backward.
    """
    num_tasks = len(losses)
    inputs = list(shared) + list(others)
    n_shared = len(shared)
    per_task: list[Sequence[Tensor | None]] = []
    for k, loss in enumerate(losses):
        if loss.grad_fn is None:
            per_task.append([None] * len(inputs))
            continue
        per_task.append(
            torch.autograd.grad(loss, inputs, retain_graph=k < num_tasks - 1, allow_unused=True)
        )
    shared_out: list[Tensor | None] = []
    for i, p in enumerate(shared):
        rows = [g[i] for g in per_task]
        if all(r is None for r in rows):
            shared_out.append(None)
            continue
        stacked = torch.zeros((num_tasks,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        for k, r in enumerate(rows):
            if r is not None:
                stacked[k].copy_(r)
        shared_out.append(stacked)
    others_out: list[Tensor | None] = []
    for j in range(len(others)):
        total: Tensor | None = None
        for g in per_task:
            r = g[n_shared + j]
            if r is not None:
                total = r if total is None else total + r
        others_out.append(total)
    reached = [any(g[i] is not None for i in range(n_shared)) for g in per_task]
    return TaskGradients(shared_out, others_out, reached)


def reachable_parameters(losses: Iterable[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that the autograd graphs of ``losses`` reach, in graph order."""
    seen_nodes: set = set()
    leaves: dict[int, Tensor] = {}
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.setdefault(id(variable), variable)
            continue
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in seen_nodes:
                stack.append(next_node)
    return list(leaves.values())
