"""What an RL algorithm is to the driver: a class registered by name that says which
services it needs and turns one step's scored trajectories into a learner batch.

Adding one is a module in ``services/algorithms/`` with a class like::

    @ALGORITHMS.register("rloo")
    class RLOO(Algorithm):
        group_relative = True
        def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]: ...

Modules in this package are imported on the first lookup of ``ALGORITHMS``
(``services.core.registry``), so nothing else needs editing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from services.core.batch_types import TokenBatch, Trajectory
from services.core.learner_batches import LearnerBatch
from services.core.config import FlywheelConfig
from services.core.registry import ALGORITHMS

__all__ = ["ALGORITHMS", "Algorithm", "StepInputs", "get_algorithm"]


@dataclass
class StepInputs:
    """One step's scored trajectories, as the driver hands them to ``make_batch``.

    trajectories: B trajectories, prompt groups of ``cfg.rollout.n_samples`` consecutive
    rows for group-relative algorithms; scores [B] (the reward ensemble's aggregate);
    tokens: ``batches.build_tokens(trajectories)``; ref, old, sampler: [B, T] log-probs of
    the reference, of the learner before this step (the sampler's when streaming) and of
    the rollout engine; values [B, T] critic values or None; learner: the learner group,
    for algorithms that need extra forwards (online DPO's CHES scores); step_rewards [B, T]:
    with ``algorithm.step_rewards``, the process reward's step scores on the tokens that end
    the steps (plus the rewards of other sources on the last token), else None; preference:
    the run's ``PreferenceModel`` for algorithms that ``needs_preference``."""

    trajectories: list[Trajectory]
    scores: list[float]
    tokens: TokenBatch
    ref: Tensor
    old: Tensor
    sampler: Tensor
    values: Tensor | None
    pad_id: int
    cfg: FlywheelConfig
    learner: Any = None
    step_rewards: Tensor | None = None
    preference: Any = None

    @property
    def tis_sampler(self) -> Tensor | None:
        """The sampler's log-probs when ``algorithm.tis_cap`` asks for truncated IS weights."""
        return self.sampler if self.cfg.algorithm.tis_cap is not None else None


class Algorithm:
    """loss_kind: the learner's loss family (``LossSpec.kind``: "ppo" covers every
    policy-gradient algorithm, "dpo" pair losses); policy_loss: the registered policy loss; needs_critic: the learner trains a value
    model; group_relative: trains on whole prompt groups of n >= 2 samples (``group_reason``
    says why, for the error message); tracks_displacement: log whether a step lowers log
    p(chosen) (pair algorithms); settings: the ``algorithm.*`` fields it reads besides
    ``config.ALGORITHM_COMMON`` (a config that sets any other is an error); defaults: the
    paper's values of some of them, used where the config does not set the field."""

    loss_kind: ClassVar[str] = "ppo"
    policy_loss: ClassVar[str] = "ppo_clip"  # services.core.estimators.POLICY_LOSSES (loss_kind ppo)
    needs_critic: ClassVar[bool] = False
    group_relative: ClassVar[bool] = False
    group_reason: ClassVar[str] = ""
    tracks_displacement: ClassVar[bool] = False
    needs_preference: ClassVar[bool] = False  # make_batch compares samples with StepInputs.preference
    settings: ClassVar[frozenset[str]] = frozenset()  # the algorithm.* fields it reads besides the common ones
    defaults: ClassVar[dict[str, Any]] = {}  # its published values of algorithm.* fields a config leaves out

    def make_batch(self, x: StepInputs) -> tuple[LearnerBatch | None, dict[str, float]]:
        """(learner batch, or None when nothing is left to train on; stats for metrics.jsonl)."""
        raise NotImplementedError


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm ``name`` (a UserError naming algorithm.name otherwise)."""
    return ALGORITHMS.get(name)()
