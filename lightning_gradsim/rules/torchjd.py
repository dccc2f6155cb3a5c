"""torchjd's weightings as gate rules: ``GradientGate(rule=torchjd.aggregation.UPGradWeighting())``.

A torchjd ``Weighting`` maps the Gramian of the task gradients to one weight per task, the seam of
our rules. :class:`TorchJDRule` hands it the Gramian of ``[g_main, lambda_1 g_1, ...]`` on the
shared parameters, summed over the shared tensors (torchjd aggregates the concatenated Jacobian the
same way), in the gradients' dtype, and applies the weights ``w`` it returns to those vectors:
the shared gradient is ``w_0 g_main + sum_k w_k lambda_k g_k``. The heads get their own task's
gradient, as with every rule. Everything the gate has then applies: DDP (the Gramian is reduced
first, so every rank computes the same weights), accumulation, ``every_n_steps``, the monitor.

* Gramian weightings (UPGrad, MGDA, DualProj, IMTL-G, Aligned-MTL, CAGrad, PCGrad, GradVac, Krum,
  FairGrad, PCD, ...) get the Gramian itself.
* Matrix weightings whose weights depend on the Jacobian ``J`` only through ``J J^T`` (Mean, Sum,
  Constant, Random, Nash-MTL) get a square root ``M`` of the Gramian (``M M^T = G``); the others
  (ExcessMTL, MoDo, SDMGrad, which read the coordinates of ``J`` or need two independent Jacobians)
  are refused.
* Randomness: the weighting runs under a copy of torch's global generator seeded from the gate's
  generator (``RuleInput.generator``), so random weightings (Random, PCGrad, GradVac's visiting
  orders) draw the same on every rank, resume exactly and leave the global generator alone.
* State: the weighting is a submodule of the rule (so of the gate): its buffers (GradVac's
  ``_phi_t``, ...) are in the gate's ``state_dict`` under ``rule.weighting.``; its other plain
  attributes (step counters, Nash-MTL's previous weights as tensors) are the rule's extra state. A skipped
  step leaves it as it was: a non-finite Gramian is not handed to the weighting, and a step found
  non-finite after the weighting ran puts the state back (:meth:`TorchJDRule.commit`).
* A batch of problems (``combine(..., batch_dims=1)``, ``gradsim table1``) runs the weighting once per
  problem, in order, with one weighting (a stateful weighting would then mix the problems' states:
  refused, use one gate per problem).

Names: ``"torchjd:UPGrad"`` is ``torchjd.aggregation.UPGradWeighting()``, with options passed on
(``make_gate("torchjd:CAGrad", c=0.5)``). torchjd is imported only when such a name or object is
used; install it with ``pip install "lightning-gradsim[torchjd]"``.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import TORCHJD_PREFIX, Rule, RuleInput

__all__ = ["TorchJDRule", "weighting_class", "gramian_root", "DEFAULT_NAMES"]

#: torchjd names that build with default arguments and run on a Gramian (``"torchjd:<Name>"``).
DEFAULT_NAMES = (
    "UPGrad",
    "MGDA",
    "DualProj",
    "IMTLG",
    "AlignedMTL",
    "PCGrad",
    "GradVac",
    "PCD",
    "Mean",
    "Sum",
    "Random",
)
#: Matrix weightings whose weights depend on the Jacobian only through its Gramian.
GRAMIAN_INVARIANT = frozenset(
    {"MeanWeighting", "SumWeighting", "ConstantWeighting", "RandomWeighting", "_NashMTLWeighting"}
)
INSTALL_HINT = (
    'torchjd is not installed: pip install "lightning-gradsim[torchjd]" (or "torchjd[quadprog_projector]>=0.18").'
)
_MODULE_INTERNALS = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _aggregation() -> Any:
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err


def weighting_class(name: str) -> Any:
    """torchjd's class for ``name`` (``"UPGrad"`` -> ``UPGradWeighting``; ``"IMTL-G"``, ``"Aligned-MTL"`` and
    ``"NashMTL"`` are accepted too)."""
    agg = _aggregation()
    key = name.replace("-", "")
    if key.lower() == "nashmtl":
        return agg.NashMTL  # built with n_tasks on the first step, its weighting used
    for attr in dir(agg):
        if attr.endswith("Weighting") and attr[: -len("Weighting")].lower() == key.lower():
            return getattr(agg, attr)
    names = sorted(a[: -len("Weighting")] for a in dir(agg) if a.endswith("Weighting") and a != "Weighting")
    raise ValueError(f"torchjd has no weighting {name!r}; choose from {', '.join(names)}, NashMTL.")


def gramian_root(gram: Tensor) -> Tensor:
    """A ``(K, K)`` matrix ``M`` with ``M M^T = gram`` (from its eigendecomposition, negative rounding clipped).

    >>> g = torch.tensor([[4.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    >>> m = gramian_root(g)
    >>> torch.allclose(m @ m.T, g)
    True
    """
    values, vectors = torch.linalg.eigh(gram)
    root: Tensor = vectors * values.clamp(min=0).sqrt().unsqueeze(-2)
    return root


def _encode(value: Any) -> tuple[bool, Any]:
    """A plain attribute as something ``torch.load(weights_only=True)`` reads back (numpy arrays as tensors)."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return True, value
    if isinstance(value, torch.dtype):
        return True, {"__dtype__": str(value).removeprefix("torch.")}
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return True, {"__ndarray__": torch.from_numpy(value.copy()) if value.dtype != object else None}
    if isinstance(value, (tuple, list)):
        items = [_encode(v) for v in value]
        if all(ok for ok, _ in items):
            return True, {"__seq__": [v for _, v in items], "tuple": isinstance(value, tuple)}
    return False, None


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy()
        if "__seq__" in value:
            items = [_decode(v) for v in value["__seq__"]]
            return tuple(items) if value["tuple"] else items
    return value


class TorchJDRule(Rule, nn.Module):
    """A torchjd ``Weighting`` as a rule (see the module docstring), e.g.::

    from torchjd.aggregation import UPGradWeighting
    gate = GradientGate(rule=UPGradWeighting())  # wrapped in TorchJDRule by get_rule
    """

    deterministic = False

    def __init__(self, weighting: Any, name: str | None = None) -> None:
        nn.Module.__init__(self)
        agg = _aggregation()
        lazy_nash = isinstance(weighting, type) and weighting is agg.NashMTL
        if not lazy_nash and not isinstance(weighting, agg.Weighting):
            raise TypeError(f"TorchJDRule wraps a torchjd.aggregation.Weighting, got {type(weighting).__name__}.")
        self._nash_options: dict[str, Any] | None = None
        self._before: tuple[dict[str, Any] | None] | None = None  # the state before this step (stateful weightings)
        if lazy_nash:
            self._nash_options = {}
            weighting = None
        else:
            self._check_supported(weighting)
        self.weighting = weighting
        label = name or (type(weighting).__name__.removesuffix("Weighting") if weighting is not None else "NashMTL")
        self.name = TORCHJD_PREFIX + label.lstrip("_")

    @classmethod
    def from_name(cls, name: str, **options: Any) -> TorchJDRule:
        """``"torchjd:UPGrad"`` -> ``TorchJDRule(UPGradWeighting(**options))``."""
        short = name[len(TORCHJD_PREFIX) :] if name.startswith(TORCHJD_PREFIX) else name
        factory = weighting_class(short)
        if factory is _aggregation().NashMTL:
            rule = cls(factory, name=short)
            rule._nash_options = dict(options)
            return rule
        try:
            weighting = factory(**options)
        except TypeError as err:
            raise TypeError(
                f"torchjd's {factory.__name__} needs options: {err}. Pass them, e.g. make_gate('{TORCHJD_PREFIX}"
                f"{short}', c=0.5) or gradsim table1 --methods {TORCHJD_PREFIX}{short}:c=0.5."
            ) from err
        return cls(weighting, name=short)

    @staticmethod
    def _check_supported(weighting: Any) -> None:
        agg = _aggregation()
        gramian_base = importlib.import_module("torchjd.aggregation._weighting_bases")._GramianWeighting
        if isinstance(weighting, gramian_base) or type(weighting).__name__ in GRAMIAN_INVARIANT:
            return
        raise ValueError(
            f"{type(weighting).__name__} reads the Jacobian itself (not only its Gramian), which the gate does not "
            f"form; use a Gramian weighting ({', '.join(DEFAULT_NAMES)}, CAGrad, Krum, FairGrad, ...)."
            if isinstance(weighting, agg.Weighting)
            else f"Not a torchjd weighting: {weighting!r}"
        )

    # ------------------------------------------------------------------ the rule
    def weights(self, inp: RuleInput) -> Tensor:
        gram = inp.gramian
        k = inp.num_aux + 1
        lam = torch.cat([torch.ones(1, dtype=gram.dtype, device=gram.device), inp.aux_weight.to(gram.dtype)])
        scaled = gram * lam.unsqueeze(-1) * lam  # the Gramian of [g_main, lambda_k g_k]
        batch = scaled.shape[:-2]
        flat = scaled.reshape(-1, k, k)
        if flat.shape[0] > 1 and self._stateful():
            raise ValueError(
                f"{self.name} keeps state between steps; over a batch of {flat.shape[0]} problems it would mix their "
                "states. Use one gate per problem."
            )
        if inp.problem_generators is not None:  # keyed problems: each its own seed
            seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in inp.problem_generators]
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=inp.generator)) if inp.generator is not None else 0
            seeds = [seed + i for i in range(flat.shape[0])]
        self._before = self._snapshot() if self._stateful() else None
        # A non-finite Gramian (the step will be skipped) is not handed to the weighting: its state stays and
        # its solvers do not fail on it; the main task alone stands in for its weights.
        main_only = torch.zeros(k, dtype=flat.dtype, device=flat.device)
        main_only[0] = 1
        usable = torch.isfinite(flat).flatten(1).all(1).tolist()  # one host sync; torchjd's solvers sync anyway
        out = [self._call(g, sd) if ok else main_only for g, ok, sd in zip(flat.unbind(0), usable, seeds)]
        w = torch.stack(out).reshape(batch + (k,))
        return w.to(gram.dtype) * lam

    def _call(self, gram: Tensor, seed: int) -> Tensor:
        weighting = self._weighting(gram.shape[-1])
        cuda = gram.device.type == "cuda"
        stat = gram if not self._needs_matrix(weighting) else gramian_root(gram)
        # Seed only the generators the weighting may use (CPU, and the Gramian's GPU), restored after.
        with torch.random.fork_rng(devices=[gram.device] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[gram.device.index or 0].manual_seed(seed)
            with torch.no_grad():
                weights: Tensor = weighting(stat.detach()).to(device=gram.device)
        return weights

    def commit(self, finite: Tensor) -> None:
        """A stateful weighting's state moves on finite steps only: on a step found non-finite after it ran
        (a head, a loss, another rank), it is put back as :meth:`weights` found it (a host sync, for the
        stateful weightings only)."""
        before, self._before = self._before, None
        if before is not None and not bool(finite.all()):
            self._restore(before)

    def _snapshot(self) -> tuple[dict[str, Any] | None]:
        """The weighting's state as a checkpoint holds it (``(None,)``: Nash-MTL not built yet)."""
        return (None if self.weighting is None else copy.deepcopy(self.state_dict()),)

    def _restore(self, before: tuple[dict[str, Any] | None]) -> None:
        (saved,) = before
        if saved is None:  # Nash-MTL was built on the skipped step: build it afresh on the next one
            self.weighting = None
            return
        for path, module in self.weighting.named_modules():  # buffers created on the skipped step go again
            for name in list(module._buffers):
                if "weighting." + (f"{path}." if path else "") + name not in saved:
                    module._buffers[name] = None
        self.load_state_dict(saved)

    def _weighting(self, k: int) -> Any:
        if self.weighting is None:  # Nash-MTL needs the number of tasks
            nash = _aggregation().NashMTL(n_tasks=k, **(self._nash_options or {}))
            self.weighting = nash.weighting
        return self.weighting

    @staticmethod
    def _needs_matrix(weighting: Any) -> bool:
        gramian_base = importlib.import_module("torchjd.aggregation._weighting_bases")._GramianWeighting
        return not isinstance(weighting, gramian_base)

    def _stateful(self) -> bool:
        stateful = importlib.import_module("torchjd._mixins").Stateful
        return self.weighting is None or isinstance(self.weighting, stateful)

    def gate_open(self, inp: RuleInput, weights: Tensor) -> Tensor:
        """An auxiliary task is "open" when its weight is positive."""
        return weights[..., 1 : 1 + inp.num_aux] > 0

    def reset(self) -> None:
        """Reset a stateful weighting (torchjd's ``reset()``)."""
        if self.weighting is not None and hasattr(self.weighting, "reset"):
            self.weighting.reset()

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Any:
        attrs: dict[str, dict[str, Any]] = {}
        if self.weighting is not None:
            for path, module in self.weighting.named_modules():
                plain = {}
                for key, value in vars(module).items():
                    if key in _MODULE_INTERNALS or key.startswith(("_forward", "_backward")):
                        continue
                    ok, enc = _encode(value)
                    if ok:
                        plain[key] = enc
                attrs[path] = plain
        return {"attrs": attrs, "nash": self._nash_options is not None}

    def set_extra_state(self, state: Any) -> None:
        if not state or self.weighting is None and not state.get("attrs"):
            return
        attrs = state.get("attrs", {})
        if self.weighting is None and attrs:
            self._weighting(int(len(attrs[""].get("prvs_alpha", {}).get("__ndarray__", torch.zeros(0)))) or 1)
        modules = dict(self.weighting.named_modules())
        for path, plain in attrs.items():
            module = modules.get(path)
            if module is None:
                continue
            for key, value in plain.items():
                setattr(module, key, _decode(value))
        if type(self.weighting).__name__ == "_NashMTLWeighting" and getattr(self.weighting, "step", 0) > 0:
            self.weighting._init_optim_problem()  # the cvxpy problem is rebuilt, not saved

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Buffers a fresh weighting holds as None (created on its first step) take the checkpoint's shape.
        if self.weighting is not None:
            modules = dict(self.weighting.named_modules())
            for key, value in state_dict.items():
                if not key.startswith(prefix + "weighting.") or not isinstance(value, Tensor):
                    continue
                path, _, buffer = key[len(prefix + "weighting.") :].rpartition(".")
                module = modules.get(path)
                if module is not None and buffer in module._buffers and module._buffers[buffer] is None:
                    module._buffers[buffer] = torch.empty_like(value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __repr__(self) -> str:
        return f"TorchJDRule({self.weighting!r})" if self.weighting is not None else "TorchJDRule(NashMTL)"
