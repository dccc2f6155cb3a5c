"""Gridworld reward scales (paper D.2): the default makes the paper's reported return of 3 reachable."""

import pytest
import torch

from lightning_gradsim.rl.cli import build_parser
from lightning_gradsim.rl.experiment import ExperimentConfig
from lightning_gradsim.rl.world import REWARD_SCALES, GridSpec, sample_layouts, value_iteration, with_rewards


def _optimal_start_values(scale: str) -> torch.Tensor:
    lay = sample_layouts(40, with_rewards(GridSpec(), scale), seed=0).transformed()  # the cross task's main task
    q = value_iteration(lay, gamma=1.0, tol=1e-9)  # undiscounted, as the students are evaluated
    return q.max(-1).values.gather(1, lay.start.view(-1, 1)).squeeze(1)


def test_a_main_task_return_of_3_is_reachable_only_at_the_paper3_scale():
    paper3, legacy = _optimal_start_values("paper3"), _optimal_start_values("legacy")
    assert float(legacy.max()) < 0.5  # the only positive reward left is a GEM worth 0.5
    assert float(paper3.mean()) > 3.0  # the paper's "score on average 3 points" can be reached
    torch.testing.assert_close(paper3, 10 * legacy)  # the same problem, every reward times 10


def test_cli_default_is_paper3_and_legacy_is_kept():
    assert REWARD_SCALES["paper3"] == (10.0, 5.0, -10.0, -1.0) and REWARD_SCALES["legacy"] == (1.0, 0.5, -1.0, -0.1)
    assert build_parser().parse_args([]).rewards == "paper3"
    assert build_parser().parse_args(["--rewards", "legacy"]).rewards == "legacy"
    cfg = ExperimentConfig(rewards="paper3")
    assert cfg.spec.rewards == (0.0, 0.0, 10.0, 5.0, -10.0, -1.0) and cfg.as_dict()["rewards"] == "paper3"
    assert ExperimentConfig().spec == GridSpec()  # the library default keeps the given spec
    with pytest.raises(ValueError, match="rewards must be one of"):
        ExperimentConfig(rewards="paper")
