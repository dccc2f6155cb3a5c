"""``GateState``: everything the gate remembers between steps, in one module (and one checkpoint entry).

Buffers (in ``state_dict``, so Lightning checkpoints carry them): the smoothed cosine
``cosine_state`` and ``open_steps`` (lazily shaped ``(*B, K-1)`` once the tasks are known), the
counters ``measured_steps``, ``skipped_steps``, ``step``, and the main-gradient EMA
``main_grad_ema_{i}`` (one per shared tensor, created on the first step that needs them). Extra
state: the generator of random rules, and for ``every_n_steps`` the call counter and the weights
being reused, so that a resumed run continues exactly.

Every update is masked by the step's finiteness on the device (no host sync): a non-finite step
only counts as skipped.

>>> import torch
>>> state = GateState()
>>> state.ensure((1,), torch.zeros(()))
>>> state.smooth(torch.tensor([0.5]), beta=0.9)  # the first measured step takes the cosine as it is
tensor([0.5000])
>>> state.commit(torch.tensor([0.5]), torch.tensor([True]), finite=torch.tensor(True), keep_cosine=True)
>>> state.smooth(torch.tensor([-0.5]), beta=0.9)
tensor([0.4000])
>>> int(state.measured_steps), state.open_steps
(1, tensor([1]))
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .cosine_stats import N_MOMENTS, summarize, update_moments
from .stats import GateStats

__all__ = ["GateState", "Reuse"]

#: Names of the buffers kept at the top of a gate's ``state_dict`` before the state had its own module.
LEGACY_BUFFERS = ("cosine_state", "open_steps", "measured_steps", "skipped_steps", "step")
#: The loss weightings' state of version 0.1, at the top of the gate's state_dict then.
LEGACY_WEIGHTING = ("log_vars", "task_weights", "initial_losses", "weight_updates")


class Reuse(NamedTuple):
    """What a step of ``every_n_steps`` that measures nothing reuses from the last measured one."""

    weights: Tensor  #: the rule's weights, ``(K,)`` or ``(K+1,)``
    stats: Any  #: the measured step's GateStats
    present: list[int]  #: indices of the shared tensors the direction buffers belong to


class GateState(nn.Module):
    """The gate's state; see the module docstring. ``seed`` seeds the generator of random rules.

    Attributes:
        cosine_state: the smoothed cosine per problem and auxiliary task (``cosine_ema > 0``).
        cosine_moments: the measured cosines' moments per problem and task (``cosine_summary()``).
        open_steps: finite measured steps on which each auxiliary gate was open.
        measured_steps: finite measured steps.
        skipped_steps: non-finite steps (skipped; nothing of them is kept).
        step: every step, measured, reused or skipped.
        calls: calls of ``gate.backward`` (the ``every_n_steps`` cycle).
        reuse: the weights, statistics and direction layout reused between measured steps.
    """

    cosine_state: Tensor
    cosine_moments: Tensor
    open_steps: Tensor
    measured_steps: Tensor
    skipped_steps: Tensor
    step: Tensor

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._num_direction_buffers = 0
        #: calls of ``gate.backward`` so far (``every_n_steps`` measures on calls 0, n, 2n, ...).
        self.calls = 0
        #: the weights reused between measured steps (``every_n_steps > 1`` and ``similarity="features"``).
        self.reuse: Reuse | None = None
        #: Save the state packed (one bytes entry, plus the direction EMA) for distributed checkpoints (DCP),
        #: which load into tensors of the shapes a fresh module has (``fsdp.prepare_gate`` sets it).
        self.packed = False
        #: Per direction buffer, how to save it as a DTensor (FSDP2 shards; ``fsdp.ShardSpec``), or ``None``.
        self.direction_specs: list[Any] | None = None
        self.register_buffer("cosine_state", torch.zeros(0))
        self.register_buffer("open_steps", torch.zeros(0, dtype=torch.long))
        #: per problem and auxiliary task, the moments of the measured cosines (see ``core.cosine_stats``)
        self.register_buffer("cosine_moments", torch.zeros(0, N_MOMENTS, dtype=torch.float64))
        self.register_buffer("measured_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ per step
    def will_measure(self, every_n_steps: int) -> bool:
        """Whether the next call measures (always with ``every_n_steps == 1`` or nothing to reuse)."""
        return self.reuse is None or every_n_steps == 1 or self.calls % every_n_steps == 0

    def next_call(self, every_n_steps: int) -> bool:
        """Count a call; whether it measures (:meth:`will_measure`)."""
        measure = self.will_measure(every_n_steps)
        self.calls += 1
        return measure

    def ensure(self, shape: tuple[int, ...], like: Tensor) -> None:
        """Shape ``cosine_state``/``open_steps`` as ``shape`` (batch + auxiliary tasks) on first use."""
        if tuple(self.cosine_state.shape) != tuple(shape):
            if self.cosine_state.numel() and self.measured_steps > 0:
                raise ValueError(
                    f"The gate's state has shape {tuple(self.cosine_state.shape)} (batch + auxiliary tasks) "
                    f"but this step has {tuple(shape)}; call gate.reset_state() to start over."
                )
            self.cosine_state = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.open_steps = torch.zeros(shape, dtype=torch.long, device=like.device)
            self.cosine_moments = torch.zeros(shape + (N_MOMENTS,), dtype=torch.float64, device=like.device)
        elif self.cosine_state.dtype != like.dtype:
            self.cosine_state = self.cosine_state.to(like.dtype)

    def smooth(self, raw: Tensor, beta: float) -> Tensor:
        """``s_t = beta s_{t-1} + (1 - beta) cos_t`` (``s_0 = cos_0``); ``raw`` itself when ``beta == 0``."""
        if beta <= 0:
            return raw
        return torch.where(self.measured_steps == 0, raw, beta * self.cosine_state + (1 - beta) * raw)

    def direction(self, mains: Sequence[Tensor], beta: float) -> list[Tensor]:
        """This step's main-gradient EMA ``d_t = beta d_{t-1} + (1 - beta) g_t`` (``d_0 = g_0``), one per
        tensor of ``mains``; not stored until :meth:`commit` (which keeps it only on a finite step)."""
        self.ensure_directions(mains)
        first = self.measured_steps == 0
        return [torch.where(first, m, beta * b + (1 - beta) * m) for m, b in zip(mains, self.directions())]

    def ensure_directions(self, like: Sequence[Tensor]) -> None:
        """Shape the direction EMA buffers like ``like`` (zeros), unless they already are."""
        if self._num_direction_buffers != len(like) or any(
            getattr(self, f"main_grad_ema_{i}").shape != m.shape for i, m in enumerate(like)
        ):
            for name in self.direction_buffer_names():
                delattr(self, name)
            for i, m in enumerate(like):
                self.register_buffer(f"main_grad_ema_{i}", torch.zeros_like(m))
            self._num_direction_buffers = len(like)

    def commit(
        self,
        smoothed: Tensor,
        gate_open: Tensor,
        finite: Tensor,
        keep_cosine: bool = False,
        direction: Sequence[Tensor] | None = None,
        raw: Tensor | None = None,
        measured: Tensor | None = None,
        threshold: float = 0.0,
    ) -> None:
        """Record a measured step: the smoothed cosine (``keep_cosine``), the direction EMA, the
        counters, and (given the ``raw`` cosine and which tasks were ``measured``) the cosine's moments.
        ``finite`` (``(*B,)`` bool) masks everything: a non-finite step counts as skipped."""
        if raw is not None:
            mask = finite.unsqueeze(-1) & (torch.ones_like(gate_open) if measured is None else measured)
            self.cosine_moments.copy_(update_moments(self.cosine_moments, raw, mask, smoothed, threshold))
        if keep_cosine:
            self.cosine_state.copy_(torch.where(finite.unsqueeze(-1), smoothed, self.cosine_state))
        if direction is not None:
            for buf, new in zip(self.directions(), direction):
                keep = finite.reshape(finite.shape + (1,) * (new.dim() - finite.dim()))
                buf.copy_(torch.where(keep, new, buf))
        self.open_steps.add_((gate_open & finite.unsqueeze(-1)).long())
        every = finite.all()
        self.measured_steps.add_(every.long())
        self.skipped_steps.add_((~every).long())
        self.step.add_(1)

    def keep_for_reuse(self, reuse: Reuse) -> None:
        """Keep a measured step's weights for the steps of ``every_n_steps`` that measure nothing, if the step
        was finite (one host read); a skipped step leaves the reused weights as they were, so one poisoned
        step is one skipped step (with nothing kept yet, the next call measures afresh)."""
        if bool(reuse.stats.finite.all()):
            self.reuse = reuse

    def rng_mark(self, deterministic: bool) -> Tensor | None:
        """The generator's state before a random rule draws (``None`` for a deterministic rule), for
        :meth:`undo_draws` once the step's finiteness is known."""
        return None if deterministic else self.rng().get_state()

    def undo_draws(self, mark: Tensor | None, finite: Tensor) -> None:
        """A skipped step draws nothing: put the generator back to ``mark`` unless ``finite`` (one host read,
        random rules only), so the next finite step draws what it would have drawn without the poisoned one."""
        if mark is not None and not bool(finite.all()):
            self.rng().set_state(mark)

    def cosine_summary(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per problem and auxiliary task: the mean measured cosine, its standard error (batch means) and
        the fraction of decisions taken within two standard errors of the threshold (``core.cosine_stats``)."""
        return summarize(self.cosine_moments)

    def count(self, finite: Tensor) -> None:
        """Record a step that measured nothing (reused weights): skipped unless ``finite`` (0-d)."""
        self.skipped_steps.add_(~finite)
        self.step.add_(1)

    def recount(self, finite_before: Tensor, finite_after: Tensor, measured: bool = True) -> None:
        """A step found non-finite after it was recorded (another rank's NaN): move it to skipped (from
        measured, or, for a step that reused weights (``measured=False``), from nothing)."""
        moved = (finite_before.all() & ~finite_after.all()).long()
        if measured:
            self.measured_steps.sub_(moved)
        self.skipped_steps.add_(moved)

    def rng(self) -> torch.Generator:
        """The seeded generator handed to random rules (its state is checkpointed)."""
        if self._generator is None:
            self._generator = torch.Generator()
            self._generator.manual_seed(self.seed)
        return self._generator

    def directions(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.direction_buffer_names()]

    def direction_buffer_names(self) -> list[str]:
        return [f"main_grad_ema_{i}" for i in range(self._num_direction_buffers)]

    def select_problems(self, index: Tensor) -> None:
        """Keep only the problems ``index`` picks (a bool mask or indices along the first batch
        dimension) of a gate used with ``batch_dims >= 1``: the smoothed cosine, the open counts and
        the main-gradient EMA. For experiments that drop finished runs from a stacked batch.

        >>> import torch
        >>> state = GateState()
        >>> state.ensure((3, 1), torch.zeros(()))  # 3 problems, one auxiliary task
        >>> state.cosine_state += torch.tensor([[0.1], [0.2], [0.3]])
        >>> state.select_problems(torch.tensor([True, False, True]))
        >>> state.cosine_state
        tensor([[0.1000],
                [0.3000]])
        """
        if self.reuse is not None:
            raise ValueError(
                "select_problems: this state holds the weights every_n_steps reuses; select before the "
                "first step of a cycle or train without every_n_steps."
            )
        if self.cosine_state.dim() >= 2:  # (*B, K-1), shaped by a batched step
            self.cosine_state = self.cosine_state[index]
            self.open_steps = self.open_steps[index]
            self.cosine_moments = self.cosine_moments[index]
        elif self.cosine_state.numel():
            raise ValueError(
                f"select_problems: the state has no problem dimension (cosine state of shape "
                f"{tuple(self.cosine_state.shape)}); it is for gates used with combine(..., batch_dims=1)."
            )
        for name in self.direction_buffer_names():
            setattr(self, name, getattr(self, name)[index].clone())

    def reset(self) -> None:
        """Forget the smoothed cosine, the main-gradient EMA, the counters and the reused weights."""
        self.cosine_state = torch.zeros(0, device=self.step.device)
        self.open_steps = torch.zeros(0, dtype=torch.long, device=self.step.device)
        self.cosine_moments = torch.zeros(0, N_MOMENTS, dtype=torch.float64, device=self.step.device)
        for name in self.direction_buffer_names():
            delattr(self, name)
        self._num_direction_buffers = 0
        for b in (self.measured_steps, self.skipped_steps, self.step):
            b.zero_()
        self.reuse = None
        self.calls = 0

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> Any:
        reuse = None
        if self.reuse is not None:
            reuse = {
                "weights": self.reuse.weights,
                "present": list(self.reuse.present),
                "stats": dict(self.reuse.stats._asdict()),
            }
        return {
            "generator": self._generator.get_state() if self._generator is not None else None,
            "calls": self.calls,
            "reuse": reuse,
        }

    def set_extra_state(self, state: Any) -> None:
        if not state:
            return
        if state.get("generator") is not None:
            self.rng().set_state(state["generator"])
        self.calls = int(state.get("calls", 0))
        reuse = state.get("reuse")
        if reuse is None:
            self.reuse = None
        else:
            device = self.step.device
            fields: dict[str, Any] = {
                k: v.to(device) if isinstance(v, Tensor) else v for k, v in reuse["stats"].items()
            }
            fields.setdefault("measured", torch.ones_like(fields["gate_open"]))  # saved before 0.2: all measured
            stats = GateStats(**fields)
            self.reuse = Reuse(reuse["weights"].to(device), stats, list(reuse["present"]))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if not self.packed:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        directions = self.direction_buffer_names()
        buffers = {n: b.detach().cpu() for n, b in self._buffers.items() if b is not None and n not in directions}
        blob = io.BytesIO()
        torch.save({"buffers": buffers, "extra": self.get_extra_state()}, blob)
        destination[prefix + "_extra_state"] = blob.getvalue()
        specs = self.direction_specs or []
        for i, name in enumerate(directions):
            buf = getattr(self, name) if keep_vars else getattr(self, name).detach()
            destination[prefix + name] = specs[i].wrap(buf) if i < len(specs) and specs[i] is not None else buf

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        packed = state_dict.get(prefix + "_extra_state")
        if isinstance(packed, (bytes, bytearray)):  # saved packed (distributed checkpoint): unpack
            content = torch.load(io.BytesIO(packed), weights_only=True)
            state_dict[prefix + "_extra_state"] = content["extra"]
            state_dict.update({prefix + name: value for name, value in content["buffers"].items()})
        for key in [k for k in state_dict if k.startswith(prefix + "main_grad_ema_")]:
            if hasattr(state_dict[key], "to_local"):  # a DTensor: this rank's shard
                state_dict[key] = state_dict[key].to_local()
        moments = prefix + "cosine_moments"
        if moments not in state_dict and prefix + "open_steps" in state_dict:  # saved before 0.2: no moments yet
            shape = tuple(state_dict[prefix + "open_steps"].shape) + (N_MOMENTS,)
            state_dict[moments] = torch.zeros(shape, dtype=torch.float64)
        # Lazily shaped buffers take the shape of the checkpoint's.
        for name in ("cosine_state", "open_steps", "cosine_moments"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        n = 0
        while prefix + f"main_grad_ema_{n}" in state_dict:
            n += 1
        for name in self.direction_buffer_names():
            delattr(self, name)
        for i in range(n):
            src = state_dict[prefix + f"main_grad_ema_{i}"]
            self.register_buffer(f"main_grad_ema_{i}", torch.empty_like(src, device=self.step.device))
        self._num_direction_buffers = n
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"seed={self.seed}"


def upgrade_legacy_keys(
    state_dict: dict[str, Any],
    prefix: str,
    loss_weighting: nn.Module | None = None,
    strict: bool = True,
    error_msgs: list[str] | None = None,
) -> None:
    """Move a version 0.1 gate's keys (``<gate>.cosine_state``, its generator, a loss weighting's
    ``<gate>.log_vars``...) to where this version keeps them (``<gate>.state.cosine_state``,
    ``<gate>.loss_weighting.log_vars``), in place; explain in ``error_msgs`` what cannot load."""
    state_prefix = prefix + "state."
    names = list(LEGACY_BUFFERS)
    n = 0
    while prefix + f"main_grad_ema_{n}" in state_dict:
        names.append(f"main_grad_ema_{n}")
        n += 1
    for name in names:
        if prefix + name in state_dict and state_prefix + name not in state_dict:
            state_dict[state_prefix + name] = state_dict.pop(prefix + name)
    extra = state_dict.get(prefix + "_extra_state")
    if isinstance(extra, dict) and "generator" in extra and state_prefix + "_extra_state" not in state_dict:
        state_dict[state_prefix + "_extra_state"] = {"generator": extra["generator"], "calls": 0, "reuse": None}
    if loss_weighting is not None:
        for name in loss_weighting.state_dict():
            if prefix + name in state_dict and prefix + "loss_weighting." + name not in state_dict:
                state_dict[prefix + "loss_weighting." + name] = state_dict.pop(prefix + name)
        return
    found = [k for k in state_dict if k[len(prefix) :] in LEGACY_WEIGHTING or k.startswith(prefix + "loss_weighting.")]
    if found and strict and error_msgs is not None:
        error_msgs.append(
            f"the checkpoint's gate has a loss weighting's state ({', '.join(sorted(found))}) but this gate has "
            "none: build it the same way, e.g. make_gate('uncertainty', ...) or "
            "GradientGate(rule='sum', loss_weighting=GradNorm(...))."
        )
