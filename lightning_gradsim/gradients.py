"""Getting per-task gradients: the only part of the gate that runs autograd.

The gate needs, for every task ``k``, its gradient on each shared parameter (kept separate), and
for every other parameter (task heads) the sum over tasks of their gradients, which is exactly
what plain ``backward`` of each task's own loss gives a head.

How the per-task gradients are taken depends on the autograd graph (see :func:`inspect_graph`):

* ``"separate"``: the tasks' graphs share no node except the parameters themselves (each task
  has its own batch and its own forward pass). One ``torch.autograd.grad`` per task then does
  exactly the work of one plain summed backward, and the gradients stay per task (no stacking).
* ``"batched"``: the tasks share trunk work (one batch, one forward) on an accelerator. A single
  ``torch.autograd.grad(..., is_grads_batched=True)`` pushes the K cotangents through the graph
  together (vmap) and returns ``(K, *param.shape)`` stacks.
* ``"sequential"``: the tasks share trunk work on the CPU (as fast as ``"batched"`` there, with
  less memory), or vmap cannot run (an op without a batching rule; the gate falls back by
  itself): one ``torch.autograd.grad(retain_graph=True)`` per task.

Example::

    info = inspect_graph(losses, shared)
    grads = per_task_gradients(losses, shared, heads, strategy="auto", info=info)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TaskGradients",
    "PerTaskGradients",
    "GraphInfo",
    "task_gradients",
    "per_task_gradients",
    "inspect_graph",
    "reachable_parameters",
    "STRATEGIES",
]

#: Accepted values of ``strategy``.
STRATEGIES = ("auto", "separate", "batched", "sequential")


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


class PerTaskGradients:
    """Per-task gradients on the shared parameters, in whichever layout was cheapest to get.

    Exactly one of ``stacked`` / ``rows`` is set:

    * ``stacked[i]``: ``(K, *shape)`` tensor for shared parameter ``i`` (batched backward), or
      ``None`` when no task reaches it;
    * ``rows[k][i]``: task ``k``'s gradient on shared parameter ``i`` or ``None`` when the task
      does not reach it (per-task backward; nothing is stacked or copied).

    ``others[j]`` is the sum over tasks of their gradients on other parameter ``j`` (or ``None``),
    ``reached[k]`` whether task ``k`` reaches a shared parameter (exact for the main task, task 0),
    and ``strategy`` the path that produced them.
    """

    __slots__ = ("stacked", "rows", "others", "reached", "strategy")

    def __init__(
        self,
        stacked: list[Tensor | None] | None,
        rows: list[list[Tensor | None]] | None,
        others: list[Tensor | None],
        reached: list[bool],
        strategy: str,
    ) -> None:
        self.stacked = stacked
        self.rows = rows
        self.others = others
        self.reached = reached
        self.strategy = strategy

    @property
    def num_tasks(self) -> int:
        return len(self.reached)

    def present(self) -> list[int]:
        """Indices of the shared parameters that at least one task reaches."""
        if self.stacked is not None:
            return [i for i, s in enumerate(self.stacked) if s is not None]
        assert self.rows is not None
        n = len(self.rows[0]) if self.rows else 0
        return [i for i in range(n) if any(r[i] is not None for r in self.rows)]

    def to_task_gradients(self, shared: Sequence[Tensor]) -> TaskGradients:
        """The stacked :class:`TaskGradients` layout (copies the rows into ``(K, *shape)`` stacks)."""
        if self.stacked is not None:
            return TaskGradients(list(self.stacked), list(self.others), list(self.reached))
        assert self.rows is not None
        out: list[Tensor | None] = []
        for i, p in enumerate(shared):
            col = [r[i] for r in self.rows]
            if all(c is None for c in col):
                out.append(None)
                continue
            ref = next(c for c in col if c is not None)
            out.append(torch.stack([c if c is not None else torch.zeros_like(ref) for c in col]))
        return TaskGradients(out, list(self.others), list(self.reached))


class GraphInfo(NamedTuple):
    """What :func:`inspect_graph` found in the losses' autograd graphs.

    Attributes:
        shares_work: whether two tasks' graphs meet at a node other than a leaf parameter (they
            share trunk computation, e.g. one batch through one forward pass).
        reaches_shared: per task, whether its graph reaches a shared parameter (exact for the
            first task; for the others ``True`` as soon as they meet another task's graph).
    """

    shares_work: bool
    reaches_shared: list[bool]


def inspect_graph(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> GraphInfo:
    """Walk the losses' autograd graphs once (each node visited at most once).

    Costs a Python visit per autograd node (well under a millisecond for a ResNet-18 graph), with
    no device work and no host-device sync.

    Example::

        info = inspect_graph([main_loss, aux_loss], list(trunk.parameters()))
        info.shares_work  # True when both losses come from one forward pass of the trunk
    """
    shared_ids = {id(p) for p in shared}
    owner: dict[object, int] = {}
    shares = False
    reaches = [False] * len(losses)
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
                if id(variable) in shared_ids:
                    reaches[k] = True
                continue
            owner[node] = k
            for next_node, _ in node.next_functions:
                if next_node is not None:
                    stack.append(next_node)
    return GraphInfo(shares, reaches)


def per_task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    strategy: str = "auto",
    info: GraphInfo | None = None,
    retain_graph: bool = False,
    state: dict[str, bool] | None = None,
) -> PerTaskGradients:
    """Per-task gradients of ``losses`` on ``shared`` and summed gradients on ``others``.

    ``strategy="auto"`` takes ``"separate"`` when the graphs share no work; otherwise
    ``"batched"`` on accelerators (falling back to ``"sequential"`` if vmap fails) and
    ``"sequential"`` on the CPU, where one backward per task measured as fast as the batched one
    with less peak memory (ResNet-18, 2 cores: 1.76x vs 1.81x the plain step, 1.39x vs 1.72x its
    memory; ``benchmarks/results_cpu_2core.md``); see the module docstring. The
    graph is freed afterwards unless ``retain_graph``. ``state``: a dict kept by the caller
    between calls (the gate keeps one) remembering whether vmap ran or failed before: after a
    failure the batched path is skipped, after a success the graph is not kept for a retry.

    Example::

        grads = per_task_gradients([main_loss, aux_loss], list(trunk.parameters()), list(heads.parameters()))
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "auto":
        if info is None:
            info = inspect_graph(losses, shared)
        if not info.shares_work:
            strategy = "separate"
        else:
            on_cpu = all(loss.device.type == "cpu" for loss in losses)
            strategy = "sequential" if on_cpu else "batched"
        if strategy == "separate":
            # Disjoint graphs: nothing needs retaining, each task's graph is freed as it goes.
            return _per_task(losses, shared, others, strategy, retain_graph, disjoint=True)
    if strategy == "batched":
        out = _batched(losses, shared, others, info, retain_graph, {} if state is None else state)
        if out is not None:
            return out
        strategy = "sequential"
    return _per_task(losses, shared, others, strategy, retain_graph)


def _per_task(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    strategy: str,
    retain_graph: bool,
    disjoint: bool = False,
) -> PerTaskGradients:
    n_shared = len(shared)
    inputs = list(shared) + list(others)
    rows: list[list[Tensor | None]] = []
    other_sum: list[Tensor | None] = [None] * len(others)
    live = [k for k, loss in enumerate(losses) if loss.grad_fn is not None]
    last = live[-1] if live else -1
    for k, loss in enumerate(losses):
        if loss.grad_fn is None:
            rows.append([None] * n_shared)
            continue
        # With shared work the graph must survive until the last task; disjoint graphs need not.
        keep = retain_graph or (k != last and not disjoint)
        g = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)
        rows.append(list(g[:n_shared]))
        for j, r in enumerate(g[n_shared:]):
            if r is not None:
                total = other_sum[j]
                # Out of place: autograd may hand the same tensor to several inputs.
                other_sum[j] = r if total is None else total + r
    reached = [any(x is not None for x in r) for r in rows]
    return PerTaskGradients(None, rows, other_sum, reached, strategy)


def _batched(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    info: GraphInfo | None,
    retain_graph: bool,
    state: dict[str, bool],
) -> PerTaskGradients | None:
    # state["failed"]: vmap failed before (go sequential directly); state["ok"]: it ran before, so
    # the graph need not be kept for a sequential retry.
    num_tasks = len(losses)
    n_shared = len(shared)
    live = [k for k, loss in enumerate(losses) if loss.grad_fn is not None]
    if len(live) < 2 or state.get("failed"):
        return None
    inputs = list(shared) + list(others)
    outputs = torch.stack([losses[k] for k in live])
    ref = outputs
    eye = torch.eye(len(live), dtype=ref.dtype, device=ref.device)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            # Keep the graph for a sequential retry should vmap fail half-way (first call only).
            keep = retain_graph or not state.get("ok")
            g = torch.autograd.grad(outputs, inputs, eye, retain_graph=keep, allow_unused=True, is_grads_batched=True)
    except RuntimeError as err:  # an op without a batching rule: fall back, once and for all
        if not keep:
            raise RuntimeError(
                "The batched per-task backward (vmap) failed on a graph it had handled before, and the "
                "graph is gone; set gate.grad_strategy = 'sequential' for this model."
            ) from err
        warnings.warn(
            f"Batched per-task backward (vmap) failed ({str(err).splitlines()[0][:200]}); "
            "using one backward per task from now on.",
            RuntimeWarning,
            stacklevel=3,
        )
        state["failed"] = True
        return None
    state["ok"] = True
    stacked: list[Tensor | None] = []
    for i in range(n_shared):
        s = g[i]
        if s is not None and len(live) != num_tasks:
            full = s.new_zeros((num_tasks,) + tuple(s.shape[1:]))
            full[live] = s
            s = full
        stacked.append(s)
    other_sum = [None if x is None else x.sum(0) for x in g[n_shared:]]
    if info is None:
        info = inspect_graph(losses, shared)
    reached = list(info.reaches_shared)
    return PerTaskGradients(stacked, None, other_sum, reached, "batched")


def task_gradients(losses: Sequence[Tensor], shared: Sequence[Tensor], others: Sequence[Tensor]) -> TaskGradients:
    """Per-task gradients of ``losses`` on ``shared`` (stacked), summed gradients on ``others``.

    One ``torch.autograd.grad`` call per task. Kept for callers that want the stacked layout;
    the gate itself uses :func:`per_task_gradients`, which avoids the stack when it can.
    """
    grads = _per_task(losses, shared, others, "sequential", retain_graph=False)
    return grads.to_task_gradients(shared)


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
