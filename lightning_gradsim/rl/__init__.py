"""The paper's RL experiment: distillation from a teacher in partially observable gridworlds.

* :mod:`~lightning_gradsim.rl.world`: layouts, the exact model, policy evaluation, value iteration.
* :mod:`~lightning_gradsim.rl.env`: ``GridworldEnv``, a gymnasium environment (id
  ``"lightning_gradsim/Gridworld-v0"``, registered on import when gymnasium is installed).
* :mod:`~lightning_gradsim.rl.batched`: ``BatchedGridworld``, many gridworlds stepped in torch.
* :mod:`~lightning_gradsim.rl.teacher`, :mod:`~lightning_gradsim.rl.student`: Q-learning teacher, linear students.
* :mod:`~lightning_gradsim.rl.training`: ``StudentTrainer``, the five methods stepped in one batch.
* :mod:`~lightning_gradsim.rl.experiment`, :mod:`~lightning_gradsim.rl.claims`,
  :mod:`~lightning_gradsim.rl.report`: ``run_experiment``, ``assess_claims``, ``write_outputs``
  (``gradsim gridworld``).

Example::

    from lightning_gradsim.rl import ExperimentConfig, run_experiment, write_outputs
    write_outputs(run_experiment(ExperimentConfig(envs=20, steps=1_000, transfers=("cross", "same"))), "runs/gridworld")
"""

from __future__ import annotations

from .batched import BatchedGridworld
from .claims import assess_claims
from .experiment import METHODS, ExperimentConfig, ExperimentResult, run_experiment
from .report import write_outputs
from .teacher import q_learning, teacher_policy
from .world import GridSpec, Layouts, policy_evaluation, sample_layouts, value_iteration

ENV_ID = "lightning_gradsim/Gridworld-v0"

__all__ = [
    "ENV_ID",
    "BatchedGridworld",
    "METHODS",
    "assess_claims",
    "ExperimentConfig",
    "ExperimentResult",
    "GridSpec",
    "Layouts",
    "policy_evaluation",
    "q_learning",
    "run_experiment",
    "sample_layouts",
    "teacher_policy",
    "value_iteration",
    "write_outputs",
]


def _register() -> None:
    try:
        import gymnasium
    except ImportError:  # gymnasium is optional: pip install lightning-gradsim[rl]
        return
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="lightning_gradsim.rl.env:GridworldEnv")


_register()
