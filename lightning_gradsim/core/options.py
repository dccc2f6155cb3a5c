"""What the gate accepts: its options, the task losses, the parameter lists (all checked up front).

Every check raises before any gradient is taken, with an error that names the value and the fix.

>>> import torch
>>> names, losses = named_losses(torch.tensor(1.0, requires_grad=True), {"rotated": torch.tensor(2.0)})
>>> names, [tuple(x.shape) for x in losses]
(['rotated'], [(), ()])
>>> check_options(threshold=1.5)
Traceback (most recent call last):
...
ValueError: threshold must be a cosine in [-1, 1], got 1.5 (the gate would never or always open).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..rules import Rule
from .graph import GraphInfo, walk_graph
from .loss_weighting import LossWeighting
from .transforms import Transforms

__all__ = [
    "cached_tensor",
    "check_transforms",
    "other_parameters",
    "with_reference",
    "check_per_tensor",
    "check_reference",
    "warn_unreached",
    "GateConfig",
    "check_update_vectors",
    "aux_weight_values",
    "MAIN_TASK",
    "check_options",
    "named_losses",
    "check_names",
    "shared_list",
    "unique",
    "as_list",
    "weigh",
    "check_dtensor_inputs",
]

#: The key of the main task's loss.
MAIN_TASK = "main"


class GateConfig(NamedTuple):
    """The gate's settings as one step sees them (read from the gate at each call; see ``GradientGate``).

    Attributes:
        rule: the rule (Gramian -> weights).
        threshold: the cosine at or above which an auxiliary gradient is used.
        cosine_ema: EMA factor of the cosine (0: this step's).
        main_grad_ema: EMA factor of the main gradient used as the projection direction (0: this step's).
        per_layer: the cosine is the mean of the per-tensor cosines.
        similarity: ``"parameters"`` or ``"features"``.
        every_n_steps: measure every this many calls, reuse the weights in between.
        loss_weighting: the loss weighting composed with the gate, if any.
    """

    rule: Rule
    threshold: float
    cosine_ema: float
    main_grad_ema: float
    per_layer: bool
    similarity: str
    every_n_steps: int
    loss_weighting: LossWeighting | None


def aux_weight_values(aux_weight: float | dict[str, float], names: Sequence[str]) -> tuple[float, ...]:
    """The lambdas of the auxiliary ``names``, in order.

    >>> aux_weight_values({"b": 0.5, "a": 2.0}, ["a", "b"]), aux_weight_values(0.3, ["a", "b"])
    ((2.0, 0.5), (0.3, 0.3))
    """
    return tuple(aux_weight[n] for n in names) if isinstance(aux_weight, dict) else (aux_weight,) * len(names)


def check_update_vectors(
    main: Tensor | Sequence[Tensor],
    aux: Sequence[Tensor | Sequence[Tensor]] | Mapping[str, Tensor | Sequence[Tensor]],
    batch_dims: int,
) -> tuple[list[str], list[Tensor], list[list[Tensor]], bool]:
    """``GradientGate.combine``'s inputs as ``(names, main tensors, auxiliary tensors, main was one tensor)``,
    or a clear error (no vector, shapes that differ, too few dimensions)."""
    main_list, single = as_list(main)
    if isinstance(aux, Mapping):
        names, aux_items = [str(n) for n in aux.keys()], list(aux.values())
    else:
        aux_items = list(aux)
        names = [f"aux{i}" for i in range(len(aux_items))]
    if not aux_items:
        raise ValueError("combine() needs at least one auxiliary vector.")
    aux_lists = []
    for name, a in zip(names, aux_items):
        a_list, _ = as_list(a)
        if len(a_list) != len(main_list) or any(x.shape != m.shape for x, m in zip(a_list, main_list)):
            raise ValueError(
                f"Auxiliary vector {name!r} has shapes {[tuple(x.shape) for x in a_list]} but the main "
                f"vector has {[tuple(m.shape) for m in main_list]}; they must match tensor for tensor."
            )
        aux_lists.append(a_list)
    for m in main_list:
        if m.dim() < batch_dims:
            raise ValueError(f"batch_dims={batch_dims} but a tensor has only {m.dim()} dimensions.")
    return names, main_list, aux_lists, single


def check_options(
    threshold: Any = 0.0,
    cosine_ema: Any = 0.0,
    main_grad_ema: Any = 0.0,
    seed: Any = 0,
    similarity: Any = "parameters",
    every_n_steps: Any = 1,
    loss_weighting: Any = None,
) -> None:
    """Raise a clear error for an option of :class:`~lightning_gradsim.GradientGate` it cannot work with."""
    for name, value in (("threshold", threshold), ("cosine_ema", cosine_ema), ("main_grad_ema", main_grad_ema)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold must be a cosine in [-1, 1], got {threshold!r} (the gate would never or always open)."
        )
    if not 0.0 <= cosine_ema < 1.0:
        raise ValueError(f"cosine_ema must be in [0, 1), got {cosine_ema}.")
    if not 0.0 <= main_grad_ema < 1.0:
        raise ValueError(f"main_grad_ema must be in [0, 1), got {main_grad_ema}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__}).")
    if similarity not in ("parameters", "features"):
        raise ValueError(f"similarity must be 'parameters' or 'features', got {similarity!r}.")
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
    if loss_weighting is not None and not isinstance(loss_weighting, LossWeighting):
        raise TypeError(f"loss_weighting must be a LossWeighting, got {type(loss_weighting).__name__}.")
    if (
        loss_weighting is not None
        and loss_weighting.needs_parameter_gramian
        and (similarity != "parameters" or every_n_steps > 1)
    ):
        raise ValueError(
            f"{type(loss_weighting).__name__} reads the per-layer Gramian of the parameter gradients at every "
            "step: use it with similarity='parameters' and every_n_steps=1."
        )


def named_losses(
    main_loss: Tensor, aux_losses: Sequence[Tensor] | Mapping[str, Tensor]
) -> tuple[list[str], list[Tensor]]:
    """The auxiliary tasks' names and the losses ``[main, aux...]`` as 0-d tensors (checked)."""
    if isinstance(aux_losses, Mapping):
        names, aux = [str(n) for n in aux_losses.keys()], list(aux_losses.values())
    elif isinstance(aux_losses, Tensor):
        names, aux = ["aux0"], [aux_losses]
    else:
        aux = list(aux_losses)
        names = [f"aux{i}" for i in range(len(aux))]
    if not aux:
        raise ValueError(
            "No auxiliary loss was given: the gate needs at least one. Train with plain backward() "
            "(automatic optimization) when there is no auxiliary task."
        )
    for name, loss in [(MAIN_TASK, main_loss)] + list(zip(names, aux)):
        if not isinstance(loss, Tensor):
            raise TypeError(f"Loss {name!r} must be a torch.Tensor, got {type(loss).__name__}.")
        if loss.numel() != 1:
            raise ValueError(
                f"Loss {name!r} has shape {tuple(loss.shape)}; the gate needs a scalar loss per task. "
                "Reduce it first, e.g. loss.mean()."
            )
    if not main_loss.requires_grad:
        raise ValueError(
            "The main loss does not require grad: it must be computed from the model's parameters "
            "(not under torch.no_grad() and not detached)."
        )
    return names, [main_loss.reshape(())] + [a.reshape(()) for a in aux]


def check_names(names: list[str], known: list[str] | None, aux_weight: float | dict[str, float]) -> list[str]:
    """The gate's auxiliary task names after this step (``known``: before it), or a clear error."""
    if MAIN_TASK in names:
        raise ValueError(f"{MAIN_TASK!r} names the main task; give auxiliary tasks other names.")
    if known is None:
        if isinstance(aux_weight, dict) and sorted(aux_weight) != sorted(names):
            raise ValueError(
                f"aux_weight names tasks {sorted(aux_weight)} but the auxiliary tasks are {names}; "
                "give one weight per auxiliary task name."
            )
        return list(names)
    if list(names) != known:
        raise ValueError(
            f"The auxiliary tasks changed from {known} to {names}; the gate keeps state per task. "
            "Always pass the same tasks in the same order, or call gate.reset_state() and set gate.aux_names = None."
        )
    return known


def shared_list(shared_params: Iterable[Tensor]) -> list[Tensor]:
    """The distinct shared tensors that require grad, or a clear error when there is none."""
    if isinstance(shared_params, Tensor):
        shared_params = [shared_params]
    params = list(unique(shared_params))
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(
            "shared_params is empty"
            + (" (all of them have requires_grad=False)" if params else "")
            + ": pass the parameters of the backbone the tasks share, e.g. model.trunk.parameters()."
        )
    return trainable


def weigh(lw: LossWeighting, names: list[str], losses: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The losses times ``w_i lambda_i`` (``w`` keeping its autograd history) and ``w * lambda`` (detached)."""
    like = losses[0].detach()
    like = like if like.is_floating_point() else like.float()
    terms = lw.loss_weights(len(losses), like)
    lam = lw.lambda_values(names)
    weighted = [w * lam_i * loss for w, lam_i, loss in zip(terms, lam, losses)]
    return weighted, torch.stack([w.detach() for w in terms]) * lw.lambdas(names, like)


def as_list(x: Tensor | Sequence[Tensor]) -> tuple[list[Tensor], bool]:
    """``([x], True)`` for a tensor, ``(list(x), False)`` for a sequence."""
    if isinstance(x, Tensor):
        return [x], True
    return list(x), False


def unique(params: Iterable[Tensor]) -> Iterable[Tensor]:
    """``params`` without repeats (by identity), in order."""
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def check_dtensor_inputs(
    pipeline: Transforms,
    others_given: bool,
    similarity: str,
    every_n_steps: int,
    loss_weighting: LossWeighting | None,
    reference_loss: Tensor | None = None,
) -> None:
    """What the gate needs when its shared parameters are FSDP2 shards (DTensors)."""
    if reference_loss is not None:
        raise NotImplementedError("reference_loss is not supported under FSDP2 yet; use DDP for it.")
    if not any(t.handles_dtensor_shards for t in pipeline.items):
        raise ValueError(
            "The shared parameters are DTensors (FSDP2): pass transforms=[FSDPShards()] to gate.backward() so that "
            "the Gramian is reduced over the shards (GradSimMixin does this under ModelParallelStrategy)."
        )
    if not others_given:
        raise ValueError(
            "Under FSDP2 pass other_params= (the heads) to gate.backward(): the autograd graph cannot name them."
        )
    if similarity != "parameters" or every_n_steps != 1:
        raise ValueError(
            "Under FSDP2 the gate takes the per-task parameter gradients: similarity='parameters' and "
            "every_n_steps=1, "
            f"not similarity={similarity!r}, every_n_steps={every_n_steps}."
        )
    if loss_weighting is not None:
        raise NotImplementedError(
            f"Loss weightings ({type(loss_weighting).__name__}) are not supported under FSDP2; use DDP for them."
        )


def warn_unreached(names: Sequence[str], reached: Sequence[bool], warned: set[str]) -> None:
    """Warn once per auxiliary task (recorded in ``warned``) whose loss does not reach the shared parameters:
    its cosine cannot be measured, so the gate reports it closed (``GateStats.measured``) and it trains only
    its own parameters."""
    for name, hit in zip(names, list(reached)[1:]):
        if not hit and name not in warned:
            warned.add(name)
            warnings.warn(
                f"The auxiliary loss {name!r} does not reach the shared parameters (its head reads detached "
                "features, or the trunk is not among shared_params): its cosine is not measured and it trains "
                "only its own parameters. Warned once per task.",
                UserWarning,
                stacklevel=4,
            )


def check_per_tensor(rule: Any, similarity: Any, every_n_steps: Any) -> None:
    """A rule that weighs each shared tensor on its own (``per_tensor_weights``) needs this step's per-tensor
    parameter gradients and applies no direction vector.

    >>> from lightning_gradsim.rules import get_rule
    >>> check_per_tensor(get_rule("gradvac", per_tensor=True), "features", 1)
    Traceback (most recent call last):
    ...
    ValueError: GradVac(beta=0.01, per_tensor=True, min_target=None, eps=0.0) weighs each shared tensor on its own: ...
    """
    if not getattr(rule, "per_tensor_weights", False):
        return
    if similarity != "parameters" or every_n_steps != 1 or rule.uses_main_direction:
        raise ValueError(
            f"{rule!r} weighs each shared tensor on its own: it needs similarity='parameters' and every_n_steps=1 "
            f"(got {similarity!r}, {every_n_steps}) and a rule without a direction vector; use the whole-trunk "
            "variant (e.g. GradVac(per_tensor=False)) with these options."
        )


def check_reference(reference_loss: Any, similarity: str, rule: Any = None) -> None:
    """A held-out reference loss must be a scalar tensor with a gradient, and the gate must take parameter
    gradients (``similarity="parameters"``) with a rule that weighs the whole trunk."""
    if reference_loss is None:
        return
    if getattr(rule, "per_tensor_weights", False):
        raise ValueError(
            f"reference_loss is not supported with {rule!r}, which weighs each shared tensor on its own; use the "
            "whole-trunk variant (per_tensor=False) to measure against a held-out batch."
        )
    if not isinstance(reference_loss, Tensor) or reference_loss.numel() != 1:
        shape = tuple(reference_loss.shape) if isinstance(reference_loss, Tensor) else ""
        raise TypeError(
            f"reference_loss must be a scalar tensor (the main task's loss on a held-out batch), got "
            f"{type(reference_loss).__name__}{shape}."
        )
    if not reference_loss.requires_grad:
        raise ValueError(
            "reference_loss does not require grad: compute it from the model (not under torch.no_grad()), so that "
            "its gradient on the shared parameters can be taken."
        )
    if similarity != "parameters":
        raise ValueError(
            f"reference_loss needs similarity='parameters' (the gradients on the shared parameters), not "
            f"{similarity!r}."
        )


def check_transforms(pipeline: Transforms, similarity: str, every_n_steps: int) -> None:
    """Transforms that act on the per-task parameter gradients need a step that takes them."""
    if pipeline.needs_task_gradients and (similarity == "features" or every_n_steps > 1):
        raise ValueError(
            f"The transforms {pipeline.items} need the per-task parameter gradients, which "
            f"similarity={similarity!r} / every_n_steps={every_n_steps} do not take: gradient "
            "accumulation, DDP with gradsim_sync='global' and 16-mixed precision need similarity='parameters' "
            "and every_n_steps=1."
        )


def other_parameters(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    other_params: Iterable[Tensor] | None,
    loss_weighting: LossWeighting | None,
) -> tuple[list[Tensor], GraphInfo | None]:
    """The parameters other than ``shared`` that get their own task's gradient (``other_params``, or every
    leaf the losses reach, with the graph walk that found them), plus the loss weighting's own."""
    shared_ids = {id(p) for p in shared}
    if other_params is None:
        info = walk_graph(losses, shared)
        return [p for p in info.leaves if id(p) not in shared_ids], info
    others = [p for p in unique(other_params) if p.requires_grad and id(p) not in shared_ids]
    if loss_weighting is not None:
        known = {id(o) for o in others}
        others += [p for p in loss_weighting.own_parameters() if id(p) not in known]
    return others, None


def with_reference(
    losses: Sequence[Tensor], reference_loss: Tensor, shared: Sequence[Tensor]
) -> tuple[list[Tensor], GraphInfo]:
    """The losses with the held-out reference loss as a last task, and the graph walk over them; a clear
    error if the reference does not reach the shared parameters."""
    extended = [*losses, reference_loss.reshape(())]
    info = walk_graph(extended, shared)
    if not info.reaches_shared[-1]:
        raise ValueError(
            "reference_loss does not depend on any shared parameter: compute it from the trunk's output on "
            "the held-out batch (the main head on trunk(x_heldout))."
        )
    return extended, info


def cached_tensor(cache: dict[tuple[Any, ...], Tensor], values: tuple[float, ...], like: Tensor) -> Tensor:
    """``values`` as a tensor on ``like``'s device in float32 or wider, built once per (values, dtype, device)
    and kept in ``cache`` (one entry): no host-to-device copy on every step.

    >>> cache = {}
    >>> a = cached_tensor(cache, (0.5, 1.0), torch.zeros(2))
    >>> a is cached_tensor(cache, (0.5, 1.0), torch.zeros(3)), a.dtype
    (True, torch.float32)
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    key = (values, dtype, like.device)
    if key not in cache:
        cache.clear()
        cache[key] = torch.tensor(values, dtype=dtype, device=like.device)
    return cache[key]
