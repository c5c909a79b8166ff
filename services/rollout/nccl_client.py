"""The GPU weight-sync control plane: vLLM's ``VLLMWeightSyncClient`` protocol implemented
over our RolloutWorker actors. **Unverified: written against vLLM 0.32's documented
weight-transfer API, never run on a GPU.**

The learner's rank 0 holds this client inside vLLM's ``NCCLTrainerWeightTransferEngine``
(see ``services.learner.nccl_publisher``). Each call fans out to every worker and waits at
most ``timeout_s``; a late worker raises ``WeightSyncTimeout`` naming it, a dead one
``ServiceLost`` as soon as it is seen.
"""

from __future__ import annotations

from typing import Any

from services.core.actor_group import gather
from services.core.errors import ServiceTimeout
from services.rollout.weight_sync import WeightSyncTimeout


class PoolWeightSyncClient:
    def __init__(self, workers: list, names: list[str], timeout_s: float, ranks_per_engine: int = 1):
        self.workers, self.names, self.timeout_s = workers, names, timeout_s
        self.ranks_per_engine = ranks_per_engine
        self.next_version: int | None = None

    def _fan_out(self, what: str, refs: list) -> list:
        try:
            return gather(refs, self.names, f"weight transfer '{what}'", self.timeout_s, "rollout.sync_timeout_s")
        except ServiceTimeout as late:
            raise WeightSyncTimeout(late.actor, late.call, late.timeout_s) from None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        # vLLM hands every engine the same rank offset; each engine needs its own ranks.
        refs = [
            w.nccl_step.remote("init", {**init_info, "rank_offset": init_info["rank_offset"] + i * self.ranks_per_engine})
            for i, w in enumerate(self.workers)
        ]
        self._fan_out("init", refs)

    def start_weight_update(self) -> None:
        self._fan_out("start", [w.nccl_step.remote("start") for w in self.workers])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._fan_out("update", [w.nccl_step.remote("update", update_info) for w in self.workers])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.next_version if weight_version is None else int(weight_version)
        self._fan_out("finish", [w.nccl_step.remote("finish", None, version) for w in self.workers])
