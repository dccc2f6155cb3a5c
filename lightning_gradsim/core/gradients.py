"""Getting gradients: the only module of the library that runs autograd, and its one graph walker.

The gate needs, for every task ``k``, its gradient on each shared parameter (kept separate), and
for every other parameter (task heads) the sum over tasks of their gradients, which is exactly
what plain ``backward`` of each task's own loss gives a head.

How the per-task gradients are taken depends on the autograd graph (see :func:`walk_graph`):

* ``"separate"``: the tasks' graphs share no node except the parameters themselves (each task
  has its own batch and its own forward pass). One ``torch.autograd.grad`` per task then does
  exactly the work of one plain summed backward, and the gradients stay per task (no stacking).
* ``"batched"``: the tasks share trunk work (one batch, one forward) on an accelerator. A single
  ``torch.autograd.grad(..., is_grads_batched=True)`` pushes the K cotangents through the graph
  together (vmap) and returns ``(K, *param.shape)`` stacks. When a loss is NaN/inf it would poison
  every task's gradient (``0 * inf``), so that step goes sequential (one host read of the losses).
* ``"backward"``: FSDP2-sharded parameters, one ``loss.backward()`` per task
  (:func:`~lightning_gradsim.core.gradients.backward_gradients`).
* ``"sequential"``: the tasks share trunk work on the CPU (as fast as ``"batched"`` there, with
  less memory), or vmap cannot run (an op without a batching rule; the gate falls back by
  itself): one ``torch.autograd.grad(retain_graph=True)`` per task.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
>>> grads = per_task_gradients([(w * w).sum(), w.sum()], [w], [])
>>> grads.strategy, grads.rows
('separate', [[tensor([2., 4.])], [tensor([1., 1.])]])
>>> grads.gramian()
tensor([[[20.,  6.],
         [ 6.,  2.]]])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .graph import GraphInfo, inspect_graph
from .task_gradients import PerTaskGradients, TaskGradients

__all__ = [
    "TaskGradients",
    "PerTaskGradients",
    "task_gradients",
    "per_task_gradients",
    "feature_gradients",
    "weighted_gradients",
    "backpropagate",
    "loss_gradients",
    "backward_gradients",
    "STRATEGIES",
]

#: Accepted values of ``strategy``.
STRATEGIES = ("auto", "separate", "batched", "sequential", "backward")

#: ``on_task(k, num_tasks, row, shared)``: task ``k``'s gradients on ``shared`` as soon as they are known.
TaskReady = Callable[[int, int, Sequence["Tensor | None"], Sequence[Tensor]], None]


def per_task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    strategy: str = "auto",
    info: GraphInfo | None = None,
    retain_graph: bool = False,
    state: dict[str, bool] | None = None,
    on_task: TaskReady | None = None,
    head_tasks: int | None = None,
) -> TaskGradients:
    """Per-task gradients of ``losses`` on ``shared`` and summed gradients on ``others``.

    ``head_tasks``: only the first ``head_tasks`` losses' gradients on ``others`` are summed (the later
    ones, e.g. a held-out reference loss, are taken on ``shared`` only); ``None``: every loss.

    ``strategy="auto"`` takes ``"separate"`` when the graphs share no work; otherwise
    ``"batched"`` on accelerators (falling back to ``"sequential"`` if vmap fails) and
    ``"sequential"`` on the CPU, where one backward per task measured as fast as the batched one
    with less peak memory (ResNet-18, 2 cores: 1.76x vs 1.81x the plain step, 1.39x vs 1.72x its
    memory; ``benchmarks/results_cpu_2core.md``); see the module docstring. The
    graph is freed afterwards unless ``retain_graph``. ``state``: a dict kept by the caller
    between calls (the gate keeps one) remembering whether vmap ran or failed before: after a
    failure the batched path is skipped, after a success the graph is not kept for a retry.
    ``on_task(k, K, row, shared)``: called with each task's gradients as soon as they are known, before
    the next task's backward (``"separate"``, ``"sequential"``, ``"backward"``; e.g. to start a
    collective while the next backward runs). ``"backward"`` (never chosen by ``"auto"`` unless the
    shared parameters are FSDP2 shards) runs ``loss.backward()`` per task and reads ``.grad``: see
    :func:`~lightning_gradsim.core.gradients.backward_gradients`.

    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> h = w.tanh()  # one forward pass both tasks read: shared work
    >>> per_task_gradients([h.sum(), (2 * h).sum()], [w], [], strategy="auto").strategy
    'sequential'
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "backward":
        if head_tasks is not None and head_tasks < len(losses):
            raise ValueError("The 'backward' strategy (FSDP2) sums every loss into .grad: it takes no reference loss.")
        return backward_gradients(losses, shared, others, retain_graph, on_task)
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
            return _per_task(
                losses, shared, others, strategy, retain_graph, disjoint=True, on_task=on_task, head_tasks=head_tasks
            )
    if strategy == "batched":
        out = _batched(losses, shared, others, info, retain_graph, {} if state is None else state, head_tasks)
        if out is not None:
            return out
        strategy = "sequential"
    return _per_task(losses, shared, others, strategy, retain_graph, on_task=on_task, head_tasks=head_tasks)


def _per_task(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    strategy: str,
    retain_graph: bool,
    disjoint: bool = False,
    on_task: TaskReady | None = None,
    head_tasks: int | None = None,
) -> TaskGradients:
    n_shared = len(shared)
    inputs = list(shared) + list(others)
    heads = len(losses) if head_tasks is None else head_tasks
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
        g = torch.autograd.grad(loss, inputs if k < heads else list(shared), retain_graph=keep, allow_unused=True)
        rows.append(list(g[:n_shared]))
        if on_task is not None:
            on_task(k, len(losses), rows[k], shared)
        for j, r in enumerate(g[n_shared:]):
            if r is not None:
                total = other_sum[j]
                # Out of place: autograd may hand the same tensor to several inputs.
                other_sum[j] = r if total is None else total + r
    reached = [any(x is not None for x in r) for r in rows]
    # Fresh autograd outputs that no transform has seen (no hook): apply may build .grad in them.
    return TaskGradients(
        rows=rows,
        others=other_sum,
        reached=reached,
        strategy=strategy,
        params=shared,
        other_params=others,
        owned=on_task is None,
    )


def _batched(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    info: GraphInfo | None,
    retain_graph: bool,
    state: dict[str, bool],
    head_tasks: int | None = None,
) -> TaskGradients | None:
    # state["failed"]: vmap failed before (go sequential directly); state["ok"]: it ran before, so
    # the graph need not be kept for a sequential retry.
    num_tasks = len(losses)
    n_shared = len(shared)
    live = [k for k, loss in enumerate(losses) if loss.grad_fn is not None]
    if len(live) < 2 or state.get("failed"):
        return None
    inputs = list(shared) + list(others)
    outputs = torch.stack([losses[k] for k in live])
    if not bool(torch.isfinite(outputs.detach()).all()):
        # A NaN/inf loss: the other tasks' zero cotangent meets its infinite derivatives (0 * inf = NaN) and
        # would poison every task's gradient. One backward per task keeps the finite tasks' gradients and
        # statistics (the step is skipped all the same). One host read of K numbers, batched path only.
        return None
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
    heads = sum(1 for k in live if head_tasks is None or k < head_tasks)  # live tasks come in order
    other_sum: list[Tensor | None] = [None if x is None else x[:heads].sum(0) for x in g[n_shared:]]
    if info is None:
        info = inspect_graph(losses, shared)
    reached = list(info.reaches_shared)
    return TaskGradients(
        stacked=stacked, others=other_sum, reached=reached, strategy="batched", params=shared, other_params=others
    )


def task_gradients(losses: Sequence[Tensor], shared: Sequence[Tensor], others: Sequence[Tensor]) -> TaskGradients:
    """Per-task gradients of ``losses`` on ``shared`` (stacked), summed gradients on ``others``.

    One ``torch.autograd.grad`` call per task. Kept for callers that want the stacked layout;
    the gate itself uses :func:`per_task_gradients`, which avoids the stack when it can.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> task_gradients([w.sum(), (3 * w).sum()], [w], []).shared
    [tensor([[1., 1.],
            [3., 3.]])]
    """
    grads = _per_task(losses, shared, others, "sequential", retain_graph=False)
    return grads.to_stacked()


def feature_gradients(losses: Sequence[Tensor], feats: Sequence[Tensor], others: Sequence[Tensor]) -> TaskGradients:
    """Per-task gradients on the shared *features* ``feats`` (rows layout), summed ones on ``others``.

    The graph is kept: :func:`backpropagate` runs the combined feature gradient through the trunk.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> h = w * 2
    >>> feature_gradients([h.sum(), (h * h).sum()], [h], []).rows
    [[tensor([1., 1.])], [tensor([4., 4.])]]
    """
    grads = _per_task(losses, feats, others, "features", retain_graph=True)
    grads.params = list(feats)
    return grads


def backpropagate(
    outputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], inputs: Sequence[Tensor]
) -> list[Tensor | None]:
    """The gradients on ``inputs`` of ``sum_j <outputs[j], grad_outputs[j]>`` (frees the graph).

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> backpropagate([w * 2], [torch.tensor([1.0, 0.5])], [w])
    [tensor([2., 1.])]
    """
    return list(torch.autograd.grad(list(outputs), list(inputs), list(grad_outputs), allow_unused=True))


def weighted_gradients(
    losses: Sequence[Tensor],
    weights: Tensor,
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    into_grad: bool = False,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """``grad sum_k w_k L_k`` on ``shared`` and ``grad sum_k L_k`` on ``others`` (the heads get their own tasks').

    Two backward passes, the first through the heads only: what a step that reuses known weights
    costs. ``into_grad``: accumulate the shared gradients into ``.grad`` (as ``backward`` does, no
    copy) and return the ``.grad`` tensors.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> head = torch.nn.Parameter(torch.ones(2))
    >>> weighted_gradients([(w * head).sum(), (3 * w).sum()], torch.tensor([1.0, 0.5]), [w], [head])
    ([tensor([2.5000, 2.5000])], [tensor([1., 1.])])
    """
    head_grads: list[Tensor | None] = [None] * len(others)
    if others:
        head_grads = list(torch.autograd.grad(_sum(losses), list(others), retain_graph=True, allow_unused=True))
    total = _sum([wk.to(loss.dtype) * loss for wk, loss in zip(weights, losses)])
    if not total.requires_grad:
        return ([p.grad for p in shared] if into_grad else [None] * len(shared)), head_grads
    if into_grad:
        torch.autograd.backward(total, inputs=list(shared))
        return [p.grad for p in shared], head_grads
    return list(torch.autograd.grad(total, list(shared), allow_unused=True)), head_grads


def loss_gradients(loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """``torch.autograd.grad(loss, inputs)`` (``None`` for an input the loss does not reach).

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> loss_gradients((w * 3).sum(), [w])
    [tensor([3., 3.])]
    """
    return list(torch.autograd.grad(loss, list(inputs), allow_unused=True))


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def backward_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    retain_graph: bool = False,
    on_task: Callable[[int, int, Sequence[Tensor | None], Sequence[Tensor]], None] | None = None,
) -> TaskGradients:
    """Per-task gradients read from ``.grad`` after one ``loss.backward()`` per task (``"backward"``).

    The way under FSDP2 (``fully_shard``): ``torch.autograd.grad`` cannot reach a sharded parameter
    (autograd sees the gathered copy), but after each backward FSDP2 leaves the task's reduce-scattered
    shard (a DTensor) in ``.grad``, which this takes and clears. Per-task gradient memory is then ``K``
    shards, ``K S / N`` per rank. Every other parameter the losses reach gets ``.grad`` summed over
    tasks, as ``backward`` gives it; ``.grad`` of ``shared`` and ``others`` is left as it was.

    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> backward_gradients([(w * w).sum(), w.sum()], [w], []).rows, w.grad
    ([[tensor([2., 4.])], [tensor([1., 1.])]], None)
    """
    params = list(shared) + list(others)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    rows: list[list[Tensor | None]] = []
    live = [k for k, loss in enumerate(losses) if loss.grad_fn is not None]
    last = live[-1] if live else -1
    try:
        for k, loss in enumerate(losses):
            if loss.grad_fn is None:
                rows.append([None] * len(shared))
                continue
            torch.autograd.backward(loss, retain_graph=retain_graph or k != last)
            rows.append([p.grad for p in shared])
            for p in shared:
                p.grad = None
            if on_task is not None:
                on_task(k, len(losses), rows[k], shared)
        other_sum: list[Tensor | None] = [p.grad for p in others]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    reached = [any(g is not None for g in row) for row in rows]
    return TaskGradients(
        rows=rows, others=other_sum, reached=reached, strategy="backward", params=shared, other_params=others
    )
