"""Conv actor-critics for Atari-like games, many independent copies evaluated in one pass.

:class:`StackedActorCritic` holds ``M`` independent networks (members: one per method and seed)
whose parameters carry a leading member dimension; a forward pass runs all of them at once
(batched matrix products), and the gradient of a sum of per-member losses
is, slice by slice, each member's own gradient. ``M = 1`` is a plain single network (the teacher).

Architectures (the paper's D.3 only says "as in previous work"):

* ``"minatar"``: MinAtar's reference net: conv 16 3x3 stride 1, fully connected 128 (Young & Tian, 2019).
* ``"nature"``: the DQN/A3C/IMPALA-shallow torso: conv 32 8x8/4, 64 4x4/2, 64 3x3/1, fully connected 512
  (Mnih et al., 2015), for 84x84 frames.

Both end in a policy head (logits) and a value head.

Example:

>>> import torch
>>> net = StackedActorCritic(members=3, in_shape=(4, 10, 10), num_actions=6, seeds=[0, 1, 0])
>>> logits, value = net(torch.zeros(3, 5, 4, 10, 10))
>>> tuple(logits.shape), tuple(value.shape)
((3, 5, 6), (3, 5))
>>> bool(torch.equal(logits[0], logits[2])), bool(torch.equal(logits[0], logits[1]))  # same seed, same init
(True, False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ARCHITECTURES", "StackedActorCritic"]

#: name -> (conv layers as (out_channels, kernel, stride), hidden units)
ARCHITECTURES: dict[str, tuple[tuple[tuple[int, int, int], ...], int]] = {
    "minatar": (((16, 3, 1),), 128),
    "nature": (((32, 8, 4), (64, 4, 2), (64, 3, 1)), 512),
}


def _uniform_(t: Tensor, bound: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (2 * bound) - bound)


class StackedActorCritic(nn.Module):
    """``M`` independent conv actor-critics, evaluated together.

    Args:
        members: ``M``, the number of independent networks.
        in_shape: ``(C, H, W)`` of one observation.
        num_actions: size of the (discrete) action set.
        arch: a key of :data:`ARCHITECTURES`.
        seeds: one initialisation seed per member (members with the same seed start identical);
            default ``0..M-1``.

    ``forward(obs)`` takes ``[M, N, C, H, W]`` (float, or uint8 pixels scaled by 1/255) and returns
    ``logits [M, N, A]`` and ``values [M, N]``. :meth:`shared_parameters` are the torso and the
    policy head (what both the RL and the distillation loss reach); :meth:`value_parameters` the
    value head.
    """

    def __init__(
        self,
        members: int,
        in_shape: Sequence[int],
        num_actions: int,
        arch: str = "minatar",
        seeds: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}.")
        if members < 1 or num_actions < 1:
            raise ValueError(f"members and num_actions must be >= 1, got {members} and {num_actions}.")
        seeds = list(range(members)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != members:
            raise ValueError(f"Give one seed per member: {len(seeds)} seeds for {members} members.")
        self.members, self.arch, self.num_actions = members, arch, num_actions
        self.in_shape = tuple(int(d) for d in in_shape)
        convs, hidden = ARCHITECTURES[arch]
        c, h, w = self.in_shape
        self.conv_specs: list[tuple[int, int]] = []  # (kernel, stride)
        self.conv_weights = nn.ParameterList()
        self.conv_biases = nn.ParameterList()
        fans: list[int] = []
        for out, k, s in convs:
            if h < k or w < k:
                raise ValueError(f"Observations of shape {self.in_shape} are too small for the {arch!r} torso.")
            self.conv_weights.append(nn.Parameter(torch.empty(members, out, c, k, k)))
            self.conv_biases.append(nn.Parameter(torch.empty(members, out)))
            self.conv_specs.append((k, s))
            fans.append(c * k * k)
            c, h, w = out, (h - k) // s + 1, (w - k) // s + 1
        flat = c * h * w
        self.fc_weight = nn.Parameter(torch.empty(members, flat, hidden))
        self.fc_bias = nn.Parameter(torch.empty(members, hidden))
        self.policy_weight = nn.Parameter(torch.empty(members, hidden, num_actions))
        self.policy_bias = nn.Parameter(torch.empty(members, num_actions))
        self.value_weight = nn.Parameter(torch.empty(members, hidden, 1))
        self.value_bias = nn.Parameter(torch.empty(members, 1))
        fans += [flat, hidden, hidden]
        # torch's default init (kaiming-uniform weights, a=sqrt(5); biases U(+-1/sqrt(fan_in))), per member seed.
        weights = list(self.conv_weights) + [self.fc_weight, self.policy_weight, self.value_weight]
        biases = list(self.conv_biases) + [self.fc_bias, self.policy_bias, self.value_bias]
        for m, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            for wt, b, fan in zip(weights, biases, fans):
                _uniform_(wt[m], 1.0 / math.sqrt(fan), gen)
                _uniform_(b[m], 1.0 / math.sqrt(fan), gen)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Torso and policy head: reached by the RL loss and the distillation loss."""
        return (
            list(self.conv_weights)
            + list(self.conv_biases)
            + [self.fc_weight, self.fc_bias, self.policy_weight, self.policy_bias]
        )

    def value_parameters(self) -> list[nn.Parameter]:
        """The value head: reached by the RL loss only."""
        return [self.value_weight, self.value_bias]

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        if obs.dim() != 5 or obs.shape[0] != self.members or tuple(obs.shape[2:]) != self.in_shape:
            raise ValueError(f"Expected observations [M={self.members}, N, *{self.in_shape}], got {tuple(obs.shape)}.")
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()
        # One convolution per member: faster on CPUs than one grouped convolution (measured).
        flat = []
        for i in range(self.members):
            h = x[i]
            for wt, b, (_, s) in zip(self.conv_weights, self.conv_biases, self.conv_specs):
                h = F.relu(F.conv2d(h, wt[i], b[i], stride=s))
            flat.append(h.flatten(1))
        x = torch.stack(flat)  # [M, N, flat]
        hidden = F.relu(torch.baddbmm(self.fc_bias.unsqueeze(1), x, self.fc_weight))
        logits = torch.baddbmm(self.policy_bias.unsqueeze(1), hidden, self.policy_weight)
        values = torch.baddbmm(self.value_bias.unsqueeze(1), hidden, self.value_weight).squeeze(-1)
        return logits, values

    def member_state(self, index: int) -> dict[str, Tensor]:
        """One member's parameters as a state dict of a ``members=1`` network (a copy)."""
        return {k: v[index : index + 1].detach().clone() for k, v in self.state_dict().items()}

    def load_member_state(self, state: dict[str, Tensor]) -> None:
        """Load a ``members=1`` state dict into every member."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"State dict does not fit this network: missing {missing}, unexpected {extra}.")
        for k, v in state.items():
            if v.shape[0] != 1 or v.shape[1:] != own[k].shape[1:]:
                raise ValueError(
                    f"Parameter {k!r} has shape {tuple(v.shape)}; "
                    f"expected (1, {', '.join(map(str, own[k].shape[1:]))})."
                )
        self.load_state_dict({k: v.to(own[k].dtype).expand_as(own[k]).clone() for k, v in state.items()})
