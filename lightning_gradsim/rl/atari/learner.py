"""Batched actor-critic learner with V-trace and a distillation auxiliary loss (paper 4.4, D.3).

One :class:`BatchedLearner` trains every member of a
:class:`~lightning_gradsim.rl.atari.nets.StackedActorCritic` (one member per method and seed)
from one batch of unrolls ``[T, M, N]``. Per member it takes two update vectors on the shared
parameters (torso and policy head): the gradient of the RL loss (V-trace policy gradient,
baseline and entropy terms) and the gradient of the distillation loss (KL from the teacher to the
student on the student's states), and combines them by the member's method:

* ``rl``: the RL gradient;  * ``kl``: the KL gradient;  * ``rl_kl``: their sum (``lambda`` on KL);
* ``rl_kl_cos``: :meth:`GradientGate.combine` of the policy-gradient term and the KL gradient
  (rule, threshold, per-layer cosine, cosine EMA as in D.3), one gate state per member, plus the
  baseline and entropy terms: ``g_rl + w g_kl`` with ``w`` from the cosine of ``g_pg`` and
  ``g_kl`` (the text: "the cosine similarity between the policy gradient and distillation
  losses"). ``LearnerConfig(cosine_of="actor_critic")`` measures the cosine with the whole RL
  gradient ``g_rl`` instead (this library's earlier default).

The value head gets the RL gradient (its own task's, Proposition 2) for every method.

Example:

>>> import torch
>>> s, t = torch.tensor([[[[0.0, 0.0]]]]), torch.tensor([[[[0.0, 0.0]]]])
>>> distillation_loss(s, t).tolist()   # identical policies: KL = 0 (one member)
[0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.gate import GradientGate
from ..vtrace import from_importance_weights
from .nets import StackedActorCritic

__all__ = [
    "METHODS",
    "COSINE_OF",
    "actor_critic_terms",
    "LearnerConfig",
    "Rollout",
    "UpdateStats",
    "actor_critic_losses",
    "distillation_loss",
    "BatchedLearner",
]

METHODS: tuple[str, ...] = ("rl", "kl", "rl_kl", "rl_kl_cos")
COSINE_OF: tuple[str, ...] = ("policy_gradient", "actor_critic")


@dataclass
class LearnerConfig:
    """Hyper-parameters of :class:`BatchedLearner` (see ``docs/atari.md`` for which the paper gives)."""

    lr: float = 3e-3
    discount: float = 0.99
    entropy_cost: float = 0.01
    baseline_cost: float = 0.5
    max_grad_norm: float = 0.5
    reward_clip: float = 1.0
    aux_weight: float = 1.0
    rule: str = "weighted"
    threshold: float | None = None  #: None: 0.02 with one game, 0.01 with several (D.3)
    cosine_ema: float = 0.9
    #: what the KL gradient's cosine is measured against: "policy_gradient" (the text, 4.4: the
    #: V-trace policy-gradient term alone) or "actor_critic" (the whole RL loss: + baseline, entropy)
    cosine_of: str = "policy_gradient"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-5


class Rollout(NamedTuple):
    """One batch of unrolls, time-major: ``T`` steps of ``N`` environments for each of ``M`` members."""

    obs: Tensor  #: [T+1, M, N, *obs_shape] (the last one is the bootstrap state)
    actions: Tensor  #: [T, M, N] long
    behaviour_logits: Tensor  #: [T, M, N, A]
    rewards: Tensor  #: [T, M, N]
    dones: Tensor  #: [T, M, N] bool: the episode ended at this step
    game: Tensor  #: [N] long, index of each environment's game (same for every member)


class UpdateStats(NamedTuple):
    """Per-member statistics of one update (tensors, no host sync)."""

    cosine: Tensor  #: [M] smoothed cosine the gate used (KL vs RL gradient; 0 where not measured)
    game_cosine: Tensor  #: [M, G] smoothed cosine of the KL gradient with each game's RL gradient
    aux_weight: Tensor  #: [M] weight applied to the KL gradient
    rl_loss: Tensor  #: [M]
    kl_loss: Tensor  #: [M]


def actor_critic_losses(
    logits: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    actions: Tensor,
    behaviour_logits: Tensor,
    rewards: Tensor,
    discounts: Tensor,
    entropy_cost: float,
    baseline_cost: float,
    weights: Tensor | None = None,
) -> Tensor:
    """IMPALA's loss per member: V-trace policy gradient + ``baseline_cost`` * value + entropy bonus.

    Shapes are time-major ``[T, M, N]`` (``logits``/``behaviour_logits`` ``[T, M, N, A]``,
    ``bootstrap_value`` ``[M, N]``). Each term is averaged over ``T`` and ``N``; ``weights``
    ``[T, M, N]`` (e.g. a game mask) multiplies the per-sample terms before averaging. Returns ``[M]``.
    """
    pg, rest = actor_critic_terms(
        logits,
        values,
        bootstrap_value,
        actions,
        behaviour_logits,
        rewards,
        discounts,
        entropy_cost,
        baseline_cost,
        weights,
    )
    return pg + rest


def actor_critic_terms(
    logits: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    actions: Tensor,
    behaviour_logits: Tensor,
    rewards: Tensor,
    discounts: Tensor,
    entropy_cost: float,
    baseline_cost: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`actor_critic_losses` in two ``[M]`` parts: the policy-gradient term
    ``-log pi(a|s) * advantage`` and the rest (``baseline_cost`` * value loss - ``entropy_cost`` * entropy)."""
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    behaviour_logp = F.log_softmax(behaviour_logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    vt = from_importance_weights(
        log_rhos=(logp - behaviour_logp).detach(),
        discounts=discounts,
        rewards=rewards,
        values=values.detach(),
        bootstrap_value=bootstrap_value.detach(),
    )
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    pg = -logp * vt.pg_advantages
    rest = baseline_cost * 0.5 * (vt.vs - values) ** 2 - entropy_cost * entropy
    if weights is not None:
        pg, rest = pg * weights, rest * weights
    return pg.mean(dim=(0, 2)), rest.mean(dim=(0, 2))


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(teacher || student)`` per state, averaged over ``T`` and ``N``: ``[T, M, N, A] -> [M]``.

    Its gradient with respect to the student's logits at one state is ``softmax(s) - softmax(t)``
    (divided by ``T N``); the teacher gets none.
    """
    t_logp = F.log_softmax(teacher_logits.detach(), dim=-1)
    s_logp = F.log_softmax(student_logits, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean(dim=(0, 2))


class BatchedLearner:
    """Trains all members of ``net`` with their methods (see the module docstring).

    Args:
        net: the students, one member per entry of ``methods``.
        methods: the method of each member (entries of :data:`METHODS`).
        teacher: a one-member network (``None`` when no member uses the KL loss).
        config: hyper-parameters.
        num_games: number of games in the batch (per-game cosines are measured for each).
    """

    def __init__(
        self,
        net: StackedActorCritic,
        methods: Sequence[str],
        teacher: StackedActorCritic | None,
        config: LearnerConfig,
        num_games: int = 1,
    ) -> None:
        methods = list(methods)
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(METHODS)}.")
        if len(methods) != net.members:
            raise ValueError(f"{len(methods)} methods for a network of {net.members} members.")
        if config.cosine_of not in COSINE_OF:
            raise ValueError(f"cosine_of must be one of {COSINE_OF}, got {config.cosine_of!r}.")
        self.uses_kl = any(m != "rl" for m in methods)
        if self.uses_kl and teacher is None:
            raise ValueError("Methods kl, rl_kl and rl_kl_cos need a teacher network.")
        if teacher is not None and (
            teacher.members != 1 or teacher.num_actions != net.num_actions or teacher.in_shape != net.in_shape
        ):
            raise ValueError(
                f"The teacher ({teacher.members} member(s), input {teacher.in_shape}, {teacher.num_actions} actions) "
                f"does not fit the students (input {net.in_shape}, {net.num_actions} actions)."
            )
        self.net, self.teacher, self.cfg, self.num_games = net, teacher, config, num_games
        self.methods = methods
        dev = net.fc_weight.device
        lam = config.aux_weight
        self.main_coef = torch.tensor([0.0 if m == "kl" else 1.0 for m in methods], device=dev)
        self.aux_coef = torch.tensor([0.0 if m == "rl" else lam for m in methods], device=dev)
        self.gated = torch.tensor([m == "rl_kl_cos" for m in methods], device=dev)
        # The gate of D.3: one state per member (rows of other methods are measured, not used).
        threshold = config.threshold if config.threshold is not None else (0.02 if num_games == 1 else 0.01)
        self.gate = GradientGate(
            rule=config.rule, aux_weight=lam, threshold=threshold, cosine_ema=config.cosine_ema, per_layer=True
        )
        # Per-game cosines: the same measurement against each game's RL gradient (nothing combined).
        self.game_monitor = GradientGate(rule="main_only", cosine_ema=config.cosine_ema, per_layer=True)
        self.optimizer = torch.optim.RMSprop(
            net.parameters(), lr=config.lr, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps
        )

    def update(self, batch: Rollout) -> UpdateStats:
        """One optimiser step of every member from ``batch``; returns per-member statistics."""
        grads, stats = self.compute_update(batch)
        for p, g in zip(self.net.shared_parameters() + self.net.value_parameters(), grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def compute_update(self, batch: Rollout) -> tuple[list[Tensor], UpdateStats]:
        """The per-member update vectors (clipped), in the order ``shared_parameters() + value_parameters()``,
        and the statistics. Advances the gate's state; does not touch the parameters."""
        cfg, net = self.cfg, self.net
        t_len, m, n = batch.actions.shape
        obs = batch.obs.transpose(0, 1).reshape(m, (t_len + 1) * n, *batch.obs.shape[3:])
        logits, values = net(obs)
        logits = logits.reshape(m, t_len + 1, n, -1).transpose(0, 1)  # [T+1, M, N, A]
        values = values.reshape(m, t_len + 1, n).transpose(0, 1)
        rewards = batch.rewards.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip > 0 else batch.rewards
        discounts = cfg.discount * (~batch.dones).to(values.dtype)
        shared, heads = net.shared_parameters(), net.value_parameters()
        game_masks = [(batch.game == g).to(values.dtype).expand(t_len, m, n) for g in range(self.num_games)]
        terms = [
            actor_critic_terms(
                logits[:-1],
                values[:-1],
                values[-1],
                batch.actions,
                batch.behaviour_logits,
                rewards,
                discounts,
                cfg.entropy_cost,
                cfg.baseline_cost,
                weights=mask if self.num_games > 1 else None,
            )
            for mask in game_masks
        ]
        rl_losses = [pg + rest for pg, rest in terms]
        params = shared + heads
        game_grads = [torch.autograd.grad(loss.sum(), params, retain_graph=True) for loss in rl_losses]
        g_rl = [sum(gs) for gs in zip(*game_grads)] if self.num_games > 1 else list(game_grads[0])
        rl_loss = torch.stack(rl_losses).sum(0).detach()
        # What the KL gradient is compared with, per game (on the shared parameters): the policy-gradient
        # term alone (the text) or the whole RL loss.
        pg_text = self.uses_kl and cfg.cosine_of == "policy_gradient"
        game_mains = (
            [torch.autograd.grad(pg.sum(), shared, retain_graph=True) for pg, _ in terms]
            if pg_text
            else [gg[: len(shared)] for gg in game_grads]
        )
        g_main = [sum(gs) for gs in zip(*game_mains)] if self.num_games > 1 else list(game_mains[0])
        zeros_m = torch.zeros(m, device=values.device)
        if self.uses_kl:
            assert self.teacher is not None
            with torch.no_grad():
                t_logits, _ = self.teacher(batch.obs[:-1].reshape(1, t_len * m * n, *batch.obs.shape[3:]))
            kl = distillation_loss(logits[:-1], t_logits.reshape(t_len, m, n, -1))
            g_kl = list(torch.autograd.grad(kl.sum(), shared))
            combined, stats = self.gate.combine(g_main, {"kl": g_kl}, batch_dims=1)
            update_shared = []
            for c, g, a, gm in zip(combined, g_rl, g_kl, g_main):
                shape = (m,) + (1,) * (g.dim() - 1)
                fixed = self.main_coef.view(shape) * g + self.aux_coef.view(shape) * a
                gated = c + (g - gm) if pg_text else c  # the rule's combination, plus baseline and entropy terms
                update_shared.append(torch.where(self.gated.view(shape), gated, fixed))
            cosine = stats.smoothed_cosine[:, 0]
            weight = torch.where(self.gated, stats.weight[:, 0], self.aux_coef)
            if self.num_games > 1:
                mains = [torch.stack([gg[i] for gg in game_mains], dim=1) for i in range(len(shared))]
                auxes = [a.unsqueeze(1).expand_as(mm) for a, mm in zip(g_kl, mains)]
                _, gstats = self.game_monitor.combine(mains, {"kl": auxes}, batch_dims=2)
                game_cosine = gstats.smoothed_cosine[..., 0]
            else:
                game_cosine = cosine.unsqueeze(1)
            kl_loss = kl.detach()
        else:
            update_shared, cosine, weight, kl_loss = g_rl[: len(shared)], zeros_m, zeros_m, zeros_m
            game_cosine = zeros_m.unsqueeze(1).expand(m, self.num_games)
        grads = list(update_shared) + g_rl[len(shared) :]
        if cfg.max_grad_norm > 0:  # per member
            norm = torch.stack([g.reshape(m, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
            scale = (cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [g * scale.view((m,) + (1,) * (g.dim() - 1)) for g in grads]
        return [g.detach() for g in grads], UpdateStats(
            cosine.detach(), game_cosine.detach(), weight.detach(), rl_loss, kl_loss
        )
