"""The paper's Atari experiment (section 4.4, appendix D.3): V-trace actor-critic + distillation.

* :mod:`~lightning_gradsim.rl.vtrace`: ``from_importance_weights`` (IMPALA's V-trace).
* :mod:`.envs`: batched MinAtar (CPU default) and ALE (GPU recipe) games.
* :mod:`.nets`: ``StackedActorCritic``, many independent conv actor-critics in one pass.
* :mod:`.learner`: ``BatchedLearner``: the four methods ``rl``, ``kl``, ``rl_kl``, ``rl_kl_cos``.
* :mod:`.teacher`: the packaged sub-optimal Breakout teacher; :mod:`.experiment`, :mod:`.plots`,
  :mod:`.cli` (``gradsim atari``).

Nothing is imported here: ``minatar``, ``ale_py`` and ``matplotlib`` load only in the modules
that need them.
"""
