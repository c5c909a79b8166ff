"""What the driver needs from each service (protocols) and the one place that builds the
real ones (``build_services``: Ray actors with vLLM, the reward ensemble, the reference
server and DeepSpeed). The driver only calls what the protocols list, so in-process fakes of
them (``tests/fakes.py``) run the whole loop (streaming, staleness, checkpoints, resume, the
metrics contract) in seconds without Ray, vLLM or DeepSpeed.

Every service also has ``count_quiet_restarts() -> int`` (actors Ray restarted while idle;
the learner has none), ``metrics_texts() -> list[str]`` (Prometheus text per actor) and
``shutdown()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from torch import Tensor

from services.core.batch_types import TokenBatch, Trajectory
from services.core.config import FlywheelConfig
from services.core.learner_batches import LearnerBatch
from services.core.placement import reserve
from services.core.special_tokens import pad_token_id
from services.learner.group import LearnerGroup
from services.reference.server import LearnerReference, ReferencePool
from services.reward.ensemble import RewardService
from services.rollout.pool import RolloutPool


class Rollout(Protocol):
    """``version``: the policy version every worker holds."""

    version: int

    def generate_with_stats(self, prompts: list, sampling: Any = None) -> tuple[list[Trajectory], dict[str, float]]:
        """``rollout.n_samples`` trajectories per PromptItem (``sampling.n`` with a SamplingSpec),
        in prompt order, each with the sampler's log-probs and the policy version that produced
        it; rollout figures."""

    def sync_weights(self, weights: Any, version: int) -> dict[str, float]:
        """Load ``weights`` (the learner's ``publish_weights``) as policy ``version`` into every
        worker; ``sync/seconds`` etc."""


class PendingScores(Protocol):
    def result(self) -> Any:
        """The ensemble's scores (``EnsembleScores``: scores, member_scores, member_names, summary())."""


class Reward(Protocol):
    def submit(self, prompts: Sequence[str], completions: Sequence[str], columns: dict | None = None) -> PendingScores:
        """Start scoring; ``result()`` waits for it."""


class Reference(Protocol):
    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """The reference policy's log-prob of every response token."""


class Learner(Protocol):
    """``policy_version``: train steps made (the version the next export carries)."""

    policy_version: int

    def logprobs(self, tokens: TokenBatch) -> Tensor:
        """[B, T] per-token log-probs of the current policy (``batch_types`` alignment)."""

    def values(self, tokens: TokenBatch) -> Tensor:
        """[B, T] critic values (algorithms with ``needs_critic``)."""

    def response_hidden_sums(self, tokens: TokenBatch) -> Tensor:
        """[B, D] summed last hidden states of the response (CHES)."""

    def train_step(self, batch: LearnerBatch, spec: Any) -> dict[str, float]:
        """One train step; ``train/*`` metrics and ``policy_version``."""

    def export_weights(self) -> dict[str, Tensor]: ...

    def publish_weights(self) -> Any:
        """The current weights in the form the rollout's ``sync_weights`` takes them fastest
        (Ray: ``PublishedWeights``, already in the object store)."""

    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, directory: str) -> int:
        """Restore a ``save_checkpoint`` directory; returns its policy version."""


@dataclass
class Services:
    """The four services of a run, plus the policy's pad token and tokenizer (the PPO-ptx
    rows need it; None where no ptx term is used) and the Ray placement group, if any."""

    learner: Learner
    reference: Reference
    reward: Reward
    rollout: Rollout
    pad_id: int
    tokenizer: Any = None
    placement_group: Any = None
    started: list = field(default_factory=list)  # in start order; shut down in reverse


def build_services(cfg: FlywheelConfig, policy_dir: str, needs_critic: bool, optimizer_steps: int) -> Services:
    """Start every real service's actors (resources and replica counts from config).
    ``optimizer_steps``: what the learner's LR schedule spans."""
    from transformers import AutoTokenizer

    placement_group, placement = reserve(cfg)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pad_id = pad_token_id(tokenizer)  # never None: rl_prompts refused a tokenizer that cannot pad
    started: list = []
    try:  # every service starts at once (the rollout engines, the slowest, first); then each is waited for
        rollout = RolloutPool(policy_dir, cfg, placement=placement["rollout"], wait=False)
        started.append(rollout)
        reference = None  # LoRA: the learner's base model (adapter disabled) is the reference, no copy of it
        if cfg.learner.lora is None:
            reference = ReferencePool(policy_dir, cfg.reference, dtype=cfg.model.dtype,
                                      placement=placement["reference"], wait=False)
            started.append(reference)
        reward = RewardService(cfg.reward, placement=placement["reward"], wait=False)
        started.append(reward)
        learner = LearnerGroup(  # returns once its ranks are up (DeepSpeed's rendezvous needs them all)
            policy_dir, cfg.learner.model_copy(update={"critic": needs_critic}), dtype=cfg.model.dtype,
            total_steps=optimizer_steps, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code,
            placement=placement["learner"],
        )
        started.append(learner)
        reference = reference or LearnerReference(learner, pad_id)
        for service in (reward, reference, rollout):
            service.wait_ready()
    except BaseException:
        for service in reversed(started):  # nothing half-started is left behind
            service.shutdown()
        if placement_group is not None:
            import ray

            ray.util.remove_placement_group(placement_group)
        raise
    return Services(learner, reference, reward, rollout, pad_id, tokenizer, placement_group, started)
