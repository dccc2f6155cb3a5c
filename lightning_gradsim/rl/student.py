"""The students: a linear softmax policy and a linear value over the one-hot 9x9 view, per gridworld.

Each of ``B`` students has policy weights ``W`` ``(4, D)`` and value weights ``w`` ``(D,)`` over
the features ``x(s)`` of :func:`features` (one-hot window codes plus a bias, ``D = 487``), all
starting at zero. Every update of such a model is a sum of outer products ``c ⊗ x(s)`` over
visited cells ``s``, so ``W = C^T X`` with ``X`` the ``(S, D)`` features of the gridworld's cells and
``C`` ``(S, 4)`` the sum of the per-cell coefficients. The student is stored in this exact *dual*
form: logits at cell ``s`` are ``(K C)[s]`` with the kernel ``K = X X^T`` ``(S, S)``, and updates
are ``(S, 4)`` coefficient tables. This gives the same numbers as the primal model
(:meth:`LinearStudent.primal` returns ``W``) at a fraction of the cost, and dot products of
updates in parameter space are ``<C1^T X, C2^T X> = tr(C1^T K C2) = <L^T C1, L^T C2>`` with
``K = L L^T`` (:func:`kernel_factor`), which is what the gate measures.

Per episode (parameters fixed while it runs) the accumulator builds, online:

* the REINFORCE update with the value baseline, ``sum_t (G_t - V(s_t)) grad log pi(a_t | s_t)``
  (an eligibility trace of the score, credited with each reward: ``G_t = sum_k gamma^k r_{t+k}``
  is the discounted return-to-go);
* the value update ``sum_t (G_t - V(s_t)) grad V(s_t)`` (minus the gradient of ``0.5 sum (G_t - V_t)^2``);
* the distillation update ``-grad sum_t CE(pi_teacher(s_t), pi(s_t))``.

All three are summed over the episode's steps and divided by its length (a mean over the states
visited), and all three are *ascent* directions (``params += lr * update``).

Example::

    student = LinearStudent(kernel)            # kernel: (B, S, S) from cell_kernel(features)
    acc = EpisodeAccumulator(student, gamma=0.99)
    probs, values, actions = student.act(sim.position, generator)
    acc.record(sim.position, probs, actions, values, teacher_probs)
    _, reward, done = sim.step(actions, observe=False)
    acc.reward(reward)
    rows, policy_update, value_update, distill_update = acc.take(done)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .world import NUM_ACTIONS, NUM_CODES, GridSpec, Layouts, windows

__all__ = [
    "features",
    "feature_size",
    "cell_features",
    "cell_kernel",
    "kernel_factor",
    "LinearStudent",
    "EpisodeAccumulator",
]


def feature_size(spec: GridSpec) -> int:
    """Length of the feature vector: one-hot window plus a bias."""
    return spec.view_size**2 * NUM_CODES + 1


def features(obs: Tensor) -> Tensor:
    """``(..., V, V)`` cell codes -> ``(..., V*V*NUM_CODES + 1)`` float features (one-hot, bias last)."""
    onehot = torch.nn.functional.one_hot(obs.flatten(-2), NUM_CODES).flatten(-2).float()
    return torch.cat([onehot, torch.ones(onehot.shape[:-1] + (1,))], dim=-1)


def cell_features(layouts: Layouts) -> Tensor:
    """``(N, S, D)``: the features of the window seen at every cell of every layout."""
    n, s = len(layouts), layouts.spec.num_cells
    return features(windows(layouts.cells, torch.arange(s).expand(n, s), layouts.spec.view_radius))


def cell_kernel(layouts: Layouts, chunk: int = 256) -> Tensor:
    """``(N, S, S)`` kernel ``X X^T`` (1 + the number of window cells that agree), in float32."""
    out = []
    for lo in range(0, len(layouts), chunk):
        x = cell_features(layouts.index(slice(lo, lo + chunk)))
        out.append(x @ x.transpose(1, 2))
    return torch.cat(out)


def kernel_factor(kernel: Tensor) -> Tensor:
    """``L`` with ``L L^T = kernel`` (symmetric PSD, ``(N, S, S)``), from its eigendecomposition."""
    evals, evecs = torch.linalg.eigh(kernel.double())
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)).float()


class LinearStudent:
    """``B`` linear softmax policies and linear values, stored in dual form (see the module docstring).

    Args:
        kernel: ``(N, S, S)`` the kernels of the gridworlds.
        layout: ``(B,)`` which gridworld each student lives in (default: ``B = N``, row ``i`` in gridworld ``i``).

    Attributes:
        policy: ``(B, S, 4)`` dual coefficients ``C`` of the policy (``W = C^T X``).
        value_coef: ``(B, S)`` dual coefficients of the value (``w = X^T c``).
    """

    def __init__(self, kernel: Tensor, layout: Tensor | None = None) -> None:
        n, s, _ = kernel.shape
        self.layout = torch.arange(n) if layout is None else layout.long()
        b = self.layout.numel()
        self.kernel = kernel
        self.policy = torch.zeros(b, s, NUM_ACTIONS)
        self.value_coef = torch.zeros(b, s)
        self._rows = torch.arange(b)

    def _k(self, position: Tensor) -> Tensor:
        return self.kernel[self.layout, position]  # (B, S): x(s_b) . x(s') for all s'

    def logits(self, position: Tensor) -> Tensor:
        """``(B, 4)`` logits at each row's cell ``position`` ``(B,)``."""
        return torch.einsum("bs,bsa->ba", self._k(position), self.policy)

    def all_logits(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """``(R, S, 4)`` logits at every cell of the students ``rows`` (default: all)."""
        return torch.bmm(self.kernel[self.layout[rows]], self.policy[rows])

    def value(self, position: Tensor) -> Tensor:
        return (self._k(position) * self.value_coef).sum(-1)

    def act(self, position: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions at each row's cell; returns ``(probs (B, 4), values (B,), actions (B,))``."""
        k = self._k(position)
        probs = torch.softmax(torch.einsum("bs,bsa->ba", k, self.policy), dim=-1)
        values = (k * self.value_coef).sum(-1)
        actions = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return probs, values, actions

    def primal(self, cell_feats: Tensor) -> tuple[Tensor, Tensor]:
        """The primal weights ``(W (B, 4, D), w (B, D))`` given each row's cell features ``(B, S, D)``."""

        return torch.einsum("bsa,bsd->bad", self.policy, cell_feats), torch.einsum(
            "bs,bsd->bd", self.value_coef, cell_feats
        )


class EpisodeAccumulator:
    """Online per-cell sums of the policy-gradient, value and distillation updates of each row's episode.

    ``gamma`` discounts the returns-to-go. The traces are kept as ``sum_k gamma^-k x_k`` with a
    per-row ``scale = gamma^-t`` (rescaled when it grows large), so a reward at step ``t`` credits
    step ``k`` with ``gamma^(t-k)`` without decaying every trace at every step.
    """

    def __init__(self, student: LinearStudent, gamma: float = 1.0) -> None:
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
        b, s, a = student.policy.shape
        self.gamma = float(gamma)
        self.trace_score = torch.zeros(b, s, a)
        self.trace_visits = torch.zeros(b, s)
        self.policy_update = torch.zeros(b, s, a)
        self.value_update = torch.zeros(b, s)
        self.distill_update = torch.zeros(b, s, a)
        self.length = torch.zeros(b)
        self.scale = torch.ones(b)
        self._rows = torch.arange(b)

    def record(self, position: Tensor, probs: Tensor, actions: Tensor, values: Tensor, teacher_probs: Tensor) -> None:
        """Add step ``t``'s terms (call before :meth:`reward` of the same step)."""
        b, s, a = self.policy_update.shape
        flat = self._rows * s + position  # (row, cell) of each row's step
        score = torch.nn.functional.one_hot(actions, NUM_ACTIONS).float() - probs  # d log pi / d logits
        self.trace_score.view(b * s, a).index_add_(0, flat, score * self.scale.unsqueeze(-1))
        self.policy_update.view(b * s, a).index_add_(0, flat, -values.unsqueeze(-1) * score)
        self.distill_update.view(b * s, a).index_add_(0, flat, teacher_probs - probs)
        self.trace_visits.view(b * s).index_add_(0, flat, self.scale)
        self.value_update.view(b * s).index_add_(0, flat, -values)
        self.length += 1.0

    def reward(self, reward: Tensor) -> None:
        """Credit step ``t``'s reward to every step ``k <= t`` of the episode so far, discounted by
        ``gamma^(t-k)`` (return-to-go), and move to the next step."""
        rows = reward.nonzero().squeeze(1)
        if rows.numel():
            r = reward[rows] / self.scale[rows]
            self.policy_update.index_add_(0, rows, r.view(-1, 1, 1) * self.trace_score[rows])
            self.value_update.index_add_(0, rows, r.view(-1, 1) * self.trace_visits[rows])
        if self.gamma < 1.0:
            self.scale /= self.gamma
            big = (self.scale > 1e6).nonzero().squeeze(1)
            if big.numel():  # exact rescaling: traces and scale divided alike
                c = self.scale[big]
                self.trace_score[big] /= c.view(-1, 1, 1)
                self.trace_visits[big] /= c.view(-1, 1)
                self.scale[big] = 1.0

    def take(self, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(rows, policy_update, value_update, distill_update)`` of the finished episodes (``rows``:
        the indices where ``mask``), in dual form and divided by the episode's length (means over its
        steps, so that a long episode does not make a step too large), and a fresh start for those rows."""
        rows = mask.nonzero().squeeze(1)
        length = self.length[rows].clamp(min=1.0)  # steps in the episode
        out = (
            rows,
            self.policy_update[rows] / length.view(-1, 1, 1),
            self.value_update[rows] / length.view(-1, 1),
            self.distill_update[rows] / length.view(-1, 1, 1),
        )
        for buf in (
            self.trace_score,
            self.policy_update,
            self.distill_update,
            self.trace_visits,
            self.value_update,
            self.length,
        ):
            buf.index_fill_(0, rows, 0.0)
        self.scale.index_fill_(0, rows, 1.0)
        return out
