"""The paper's claims about Figure 4, checked on an :class:`~lightning_gradsim.rl.experiment.ExperimentResult`.

Section 4.3 claims, for the cross-task experiment (top row), that the gated methods reach the
``reward`` baseline's level in a third of its steps and end above it, that ``add`` learns quickly
but saturates low, and that ``distill`` ends lower (negative transfer); for the same-task
experiment (bottom row), that ``add`` does at least as well as the gated methods. Each claim is
made measurable as follows (per transfer and teacher temperature; "final" is the last evaluation
point; differences are paired by gridworld, ± their standard error):

* *reach in a third*: the first evaluation step at which the method's mean return reaches
  ``reward``'s final mean return is at most a third of the first step at which ``reward`` does;
* *end above*: final(method) - final(``reward``) > 0;
* *add saturates low*: final(``add``) is below every gated method's final, and ``add`` gains less
  than ``reward`` over the second half of training (it has flattened);
* *distill ends lower*: final(``distill``) - final(``reward``) < 0;
* *same task, add at least as good*: final(``add``) - final(gated) >= 0.

A claim whose methods were not run is left out. ``held`` is decided on the mean; ``note`` says when
the difference is within two standard errors of zero.

Example::

    for c in assess_claims(result):
        print(c.transfer, c.temperature, c.claim, c.measured, c.held)
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from .experiment import ExperimentResult, mean_stderr
from .training import GATED_RULES

__all__ = ["Claim", "assess_claims", "claims_markdown"]


class Claim(NamedTuple):
    transfer: str
    temperature: float
    claim: str
    measured: str
    held: bool
    note: str  #: "" or "within 2 SE"


def _diff(a: Tensor, b: Tensor) -> tuple[float, float, str]:
    mean, se = mean_stderr(a[-1] - b[-1])
    note = "within 2 SE" if math.isfinite(se) and abs(mean) < 2 * se else ""
    return mean, se, note


def _half_gain(ret: Tensor, steps: list[int]) -> float:
    means = ret.mean(1)
    half = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 2))
    return float(means[-1] - means[half])


def assess_claims(result: ExperimentResult) -> list[Claim]:
    """Every claim of section 4.3 that the run can check, per transfer and temperature."""
    cfg = result.config
    gated = [m for m in cfg.methods if m in GATED_RULES]
    reach = result.steps_to_reach("reward")
    out: list[Claim] = []
    for tr in cfg.transfers:
        for t in cfg.temperatures:
            ret = {m: result.returns[(tr, m, t)] for m in cfg.methods}
            if tr == "cross" and "reward" in ret:
                t_reward = reach[(tr, "reward", t)]
                for m in gated:
                    t_m = reach[(tr, m, t)]
                    held = t_m is not None and t_reward is not None and t_m <= t_reward / 3
                    out.append(
                        Claim(
                            tr,
                            t,
                            f"{m} reaches reward's final level in 1/3 of reward's steps",
                            f"{m} at step {t_m if t_m is not None else 'never'}, reward at {t_reward}",
                            held,
                            "",
                        )
                    )
                for m in gated:
                    d, se, note = _diff(ret[m], ret["reward"])
                    out.append(
                        Claim(tr, t, f"{m} ends above reward", f"final {m} - reward = {d:+.3f} ± {se:.3f}", d > 0, note)
                    )
                if "add" in ret and gated:
                    finals = {m: float(ret[m][-1].mean()) for m in ["add", *gated]}
                    g_add, g_reward = _half_gain(ret["add"], result.steps), _half_gain(ret["reward"], result.steps)
                    held = finals["add"] < min(finals[m] for m in gated) and g_add < g_reward
                    out.append(
                        Claim(
                            tr,
                            t,
                            "add saturates low (below the gated methods, flat at the end)",
                            "final "
                            + ", ".join(f"{m} {v:.3f}" for m, v in finals.items())
                            + f"; 2nd-half gain add {g_add:+.3f}, reward {g_reward:+.3f}",
                            held,
                            "",
                        )
                    )
                if "distill" in ret:
                    d, se, note = _diff(ret["distill"], ret["reward"])
                    out.append(
                        Claim(
                            tr,
                            t,
                            "distill ends lower than reward",
                            f"final distill - reward = {d:+.3f} ± {se:.3f}",
                            d < 0,
                            note,
                        )
                    )
            if tr == "same" and "add" in ret:
                for m in gated:
                    d, se, note = _diff(ret["add"], ret[m])
                    out.append(
                        Claim(
                            tr,
                            t,
                            f"add at least as good as {m}",
                            f"final add - {m} = {d:+.3f} ± {se:.3f}",
                            d >= 0,
                            note,
                        )
                    )
    return out


def claims_markdown(claims: list[Claim]) -> str:
    """The claims as a markdown table.

    >>> print(claims_markdown([Claim("cross", 0.0, "distill ends lower than reward", "-0.2 ± 0.01", True, "")]))
    | transfer | T | claim (paper, sec. 4.3) | measured | held |
    |---|---|---|---|---|
    | cross | 0 | distill ends lower than reward | -0.2 ± 0.01 | yes |
    """
    lines = ["| transfer | T | claim (paper, sec. 4.3) | measured | held |", "|---|---|---|---|---|"]
    for c in claims:
        held = ("yes" if c.held else "no") + (f" ({c.note})" if c.note else "")
        lines.append(f"| {c.transfer} | {c.temperature:g} | {c.claim} | {c.measured} | {held} |")
    return "\n".join(lines)
