"""The one autograd-graph walker: which tasks share trunk work, which parameters the losses reach.

:func:`walk_graph` decides how per-task gradients are taken (:mod:`~lightning_gradsim.core.gradients`),
finds the heads (the parameters a loss reaches other than the shared ones) and checks that a
``similarity="features"`` cut separates the heads from the trunk. It reads ``grad_fn`` links only
and runs no autograd.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2))
>>> info = walk_graph([(w * 2).sum(), (w * 3).sum()], [w])
>>> info.shares_work, info.reaches_shared, len(info.leaves)
(False, [True, True], 1)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch  # noqa: F401  (the examples of this module's functions use it)
from torch import Tensor

__all__ = ["GraphInfo", "walk_graph", "inspect_graph", "reachable_parameters", "check_features_cut"]


class GraphInfo(NamedTuple):
    """What :func:`walk_graph` found in the losses' autograd graphs.

    Attributes:
        shares_work: whether two tasks' graphs meet at a node other than a leaf parameter (they
            share trunk computation, e.g. one batch through one forward pass).
        reaches_shared: per task, whether its graph reaches a shared parameter (exact for the
            first task; for the others ``True`` as soon as they meet another task's graph).
        leaves: every leaf tensor requiring grad that the graphs reach, in graph order.
        crossing: with ``stop`` nodes, the first ``(task, shared parameter)`` reached without
            passing one of them, else ``None``.
    """

    shares_work: bool
    reaches_shared: list[bool]
    leaves: list[Tensor] = []
    crossing: tuple[int, Tensor] | None = None


def walk_graph(losses: Sequence[Tensor], shared: Sequence[Tensor] = (), stop: Sequence[Tensor] = ()) -> GraphInfo:
    """Walk the losses' autograd graphs once (each node visited at most once): the library's one walker.

    ``stop``: tensors (e.g. the trunk's output features) whose ``grad_fn`` the walk does not pass.
    Costs a Python visit per autograd node (well under a millisecond for a ResNet-18 graph), with
    no device work and no host-device sync.

    >>> w, v = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    >>> h = (w * 2).tanh()
    >>> info = walk_graph([h.sum(), (h * v).sum()], [w])
    >>> info.shares_work, info.reaches_shared, [tuple(p.shape) for p in info.leaves]
    (True, [True, True], [(2,), (2,)])
    """
    shared_ids = {id(p) for p in shared}
    stop_nodes = {f.grad_fn for f in stop if f.grad_fn is not None}
    stop_ids = {id(f) for f in stop}
    owner: dict[object, int] = {}
    leaves: dict[int, Tensor] = {}
    shares = False
    reaches = [False] * len(losses)
    crossing: tuple[int, Tensor] | None = None
    for k, loss in enumerate(losses):
        root = loss.grad_fn
        if root is None:
            continue
        stack = [root]
        while stack:
            node = stack.pop()
            seen = owner.get(node)
            if seen is not None:
                if seen != k:
                    shares = True
                    reaches[k] = reaches[k] or reaches[seen]
                continue
            variable = getattr(node, "variable", None)
            if variable is not None:
                # A leaf: parameters used by several tasks are shared leaves, not shared work.
                leaves.setdefault(id(variable), variable)
                if id(variable) in shared_ids:
                    reaches[k] = True
                    if stop_nodes and crossing is None and id(variable) not in stop_ids:
                        crossing = (k, variable)
                continue
            owner[node] = k
            if node in stop_nodes:
                continue
            for next_node, _ in node.next_functions:
                if next_node is not None:
                    stack.append(next_node)
    return GraphInfo(shares, reaches, list(leaves.values()), crossing)


def inspect_graph(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> GraphInfo:
    """:func:`walk_graph` without stop nodes (kept name).

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> inspect_graph([w.sum(), (2 * w).sum()], [w]).shares_work  # two forward passes: no shared work
    False
    """
    return walk_graph(losses, shared)


def reachable_parameters(losses: Iterable[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that the autograd graphs of ``losses`` reach, in graph order.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> [tuple(p.shape) for p in reachable_parameters([(w * 3).sum()])]
    [(2,)]
    """
    return walk_graph(list(losses)).leaves


def check_features_cut(losses: Sequence[Tensor], feats: Sequence[Tensor], shared: Sequence[Tensor]) -> None:
    """Raise unless every path from the losses to a shared parameter goes through ``feats``.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> h = w * 2
    >>> check_features_cut([h.sum(), (h * h).sum()], [h], [w])  # both read w only through h
    """
    info = walk_graph(losses, shared, stop=feats)
    if info.crossing is not None:
        k, variable = info.crossing
        task = "the main loss" if k == 0 else f"auxiliary loss #{k}"
        raise ValueError(
            f"With similarity='features', {task} reaches a shared parameter (shape "
            f"{tuple(variable.shape)}) without going through the marked features. Mark every "
            "trunk output the heads read with gate.mark_features(h), and give all tasks the same "
            "features; tasks with their own batches should use similarity='parameters' (which "
            "costs no extra backward for them)."
        )
