"""Many students trained at once, one step at a time: per-episode REINFORCE, distillation, and the gate.

Every row of the batch is one student in one gridworld, with one method:

=================  ==========================================================================
method             update applied when the row's episode ends
=================  ==========================================================================
``reward``         ``pg`` (policy gradient only)
``distill``        ``dg`` (distillation only; lambda does not apply)
``add``            ``pg + lambda * dg``
``cos-weighted``   ``GradientGate(rule="weighted")``: ``pg + lambda * max(0, cos) * dg`` (Algorithm 2)
``cos-unweighted`` ``GradientGate(rule="unweighted")``: ``pg + lambda * [cos >= 0] * dg`` (Algorithm 1)
=================  ==========================================================================

``pg`` is one sample of the policy-gradient estimator (the row's last episode, REINFORCE with the
value baseline) and ``dg`` the distillation gradient on that episode's states; the gate measures
the cosine of exactly these two (the paper's footnote: a single sample, not a running mean). The
gated rows of one method share one :class:`~lightning_gradsim.GradientGate` through
``combine(..., batch_dims=1)``, one independent gate row per student.

Example::

    trainer = StudentTrainer(tasks, kernel, row_kernel, teacher, ["reward", "cos-unweighted"], block=n)
    out = trainer.step()       # StepOutput: what happened at this step, and the gate's cosines
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.gate import GradientGate
from .batched import BatchedGridworld
from .student import EpisodeAccumulator, LinearStudent, kernel_factor
from .world import Layouts

__all__ = ["METHODS", "GATED_RULES", "StepOutput", "StudentTrainer"]

#: The paper's five methods (section 4.3), in its order.
METHODS: tuple[str, ...] = ("reward", "distill", "add", "cos-weighted", "cos-unweighted")
#: gated method -> rule of :class:`~lightning_gradsim.GradientGate`.
GATED_RULES: dict[str, str] = {"cos-weighted": "weighted", "cos-unweighted": "unweighted"}
#: (weight of ``pg``, weight of ``dg`` in units of lambda or, for ``distill``, absolute) of the ungated methods.
_FIXED: dict[str, tuple[float, float]] = {"reward": (1.0, 0.0), "distill": (0.0, 1.0), "add": (1.0, 1.0)}


class StepOutput(NamedTuple):
    """What one :meth:`StudentTrainer.step` did (``B`` rows)."""

    position: Tensor  #: ``(B,)`` cell each student acted in
    actions: Tensor  #: ``(B,)`` the actions it chose (before transition noise)
    reward: Tensor  #: ``(B,)`` rewards received
    done: Tensor  #: ``(B,)`` bool, the episodes that ended (and were learned from) at this step
    gated: Tensor  #: ``(G,)`` rows among ``done`` whose update went through a gate
    cosine: Tensor  #: ``(G,)`` the cosine each gate measured between its episode's ``pg`` and ``dg``
    gate_open: Tensor  #: ``(G,)`` bool, whether the distillation update was used (unweighted: cos >= 0)


class StudentTrainer:
    """``B`` linear students, each learning its own row's task from per-episode updates.

    Args:
        tasks: ``B`` layouts, the task of each row (its rewards are what the student learns).
        kernel: ``(K, S, S)`` cell kernels (:func:`~lightning_gradsim.rl.student.cell_kernel`) of the
            ``K`` distinct layouts the rows live in; ``row_kernel`` ``(B,)`` says which one.
        teacher: ``(B, S, 4)`` the teacher's action distribution at every cell, per row.
        block_methods, block: row ``i`` uses method ``block_methods[i // block]``.
        lr, aux_weight, gamma: learning rate, lambda of the distillation update, discount.
        seed: seeds the episodes (transition noise) and the students' actions.
    """

    def __init__(
        self,
        tasks: Layouts,
        kernel: Tensor,
        row_kernel: Tensor,
        teacher: Tensor,
        block_methods: Sequence[str],
        block: int,
        lr: float = 0.01,
        aux_weight: float = 1.0,
        gamma: float = 0.99,
        seed: int = 0,
    ) -> None:
        b = len(tasks)
        if len(block_methods) * block != b or row_kernel.shape != (b,) or teacher.shape[0] != b:
            raise ValueError(
                f"{len(tasks)} task rows, {len(block_methods)} blocks of {block}, {tuple(row_kernel.shape)} kernel "
                f"indices and {teacher.shape[0]} teacher rows: they must all give the same number of rows."
            )
        unknown = sorted(set(block_methods) - set(METHODS))
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
        self.lr, self.aux_weight = float(lr), float(aux_weight)
        self.teacher = teacher
        self.row_kernel = row_kernel.long()
        self.student = LinearStudent(kernel, self.row_kernel)
        self.factor = kernel_factor(kernel)  # L with L L^T = K: parameter-space dot products
        self.acc = EpisodeAccumulator(self.student, gamma=gamma)
        self.sim = BatchedGridworld(tasks, generator=torch.Generator().manual_seed(seed * 7919 + 2))
        self.generator = torch.Generator().manual_seed(seed * 7919 + 3)
        self.row_method = [m for m in block_methods for _ in range(block)]
        self.method_id = torch.tensor([METHODS.index(m) for m in self.row_method])
        self.pg_coef = torch.tensor([_FIXED.get(m, (1.0, 0.0))[0] for m in self.row_method])
        self.dg_coef = torch.tensor(
            [_FIXED.get(m, (0.0, 0.0))[1] * (1.0 if m == "distill" else self.aux_weight) for m in self.row_method]
        )
        self.gates: dict[str, tuple[GradientGate, Tensor]] = {}
        self.local = torch.full((b,), -1, dtype=torch.long)  # index of a row within its gate
        for m, rule in GATED_RULES.items():
            rows = torch.tensor([i for i, mm in enumerate(self.row_method) if mm == m], dtype=torch.long)
            if rows.numel():
                self.gates[m] = (GradientGate(rule=rule, aux_weight=self.aux_weight), rows)
                self.local[rows] = torch.arange(rows.numel())
        self._rows = torch.arange(b)
        self.sim.reset(observe=False)

    def __len__(self) -> int:
        return len(self.row_method)

    def policies(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """``(R, S, 4)`` each student's action distribution at every cell."""
        return torch.softmax(self.student.all_logits(rows), dim=-1)

    def step(self) -> StepOutput:
        """Every student acts once; finished episodes are learned from and restarted."""
        pos = self.sim.position
        probs, values, actions = self.student.act(pos, self.generator)
        self.acc.record(pos, probs, actions, values, self.teacher[self._rows, pos])
        _, reward, done = self.sim.step(actions, observe=False)
        self.acc.reward(reward)
        empty = torch.zeros(0)
        gated, cosine, opened = [torch.zeros(0, dtype=torch.long)], [empty], [empty.bool()]
        if bool(done.any()):
            rows, pg, vg, dg = self.acc.take(done)
            dg_coef = self.dg_coef[rows].clone()
            for m, (gate, gate_rows) in self.gates.items():
                sel = self.method_id[rows] == METHODS.index(m)
                if not bool(sel.any()):
                    continue
                weight, cos, is_open = self._gate(gate, gate_rows.numel(), rows[sel], pg[sel], dg[sel])
                dg_coef[sel] = weight
                gated.append(rows[sel])
                cosine.append(cos)
                opened.append(is_open)
            update = self.pg_coef[rows].view(-1, 1, 1) * pg + dg_coef.view(-1, 1, 1) * dg
            self.student.policy.index_add_(0, rows, self.lr * update)
            self.student.value_coef.index_add_(0, rows, self.lr * vg)
            self.sim.reset(mask=done, observe=False)
        return StepOutput(pos, actions, reward, done, torch.cat(gated), torch.cat(cosine), torch.cat(opened))

    def _gate(
        self, gate: GradientGate, size: int, rows: Tensor, pg: Tensor, dg: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run one gate on the finished episodes ``rows`` (dual-form ``pg``, ``dg``); returns the
        distillation coefficients, the cosines and whether the gate was open, per row.

        The parameter-space updates are ``C^T X``; their dot products are those of ``L^T C`` with
        ``K = L L^T`` (see :mod:`~lightning_gradsim.rl.student`). The gate gets each pair through an
        isometry onto the plane it spans: ``pg -> (|pg|, 0)``, ``dg -> (<pg, dg> / |pg|, rest)``,
        the same Gram matrix, hence the same cosine and rule decision, as the 1,948-dimensional
        updates, at 2 numbers per row. Rows whose episode goes on get zero vectors and their output
        is not used (the default rules keep no state that depends on them)."""
        local = self.local[rows]
        lt = self.factor[self.row_kernel[rows]].transpose(1, 2)
        u, v = torch.bmm(lt, pg).flatten(1).double(), torch.bmm(lt, dg).flatten(1).double()
        uu, uv, vv = (u * u).sum(1), (u * v).sum(1), (v * v).sum(1)
        norm = uu.sqrt()
        along = torch.where(norm > 0, uv / norm.clamp(min=1e-300), torch.zeros_like(uv))
        across = (vv - along**2).clamp(min=0).sqrt()
        z_pg = torch.zeros(size, 2).index_copy_(0, local, torch.stack([norm, torch.zeros_like(norm)], 1).float())
        z_dg = torch.zeros(size, 2).index_copy_(0, local, torch.stack([along, across], 1).float())
        _, stats = gate.combine(z_pg, {"distill": z_dg}, batch_dims=1)
        # both rules keep the main update with coefficient 1: the update is pg + weight * dg
        return stats.weight[local, 0], stats.cosine[local, 0], stats.gate_open[local, 0]
