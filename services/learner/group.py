"""M data-parallel learner ranks as Ray actors (``LearnerGroup``) around ``PolicyLearner``.

Start-up: the M ``LearnerRank`` actors are created empty; rank 0 reports its node IP and a
free port on that node; every actor then gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in its os.environ and builds its PolicyLearner (all at once: torch.distributed's
rendezvous waits for every rank). LOCAL_RANK is the rank's index among the ranks on its
node; for GPU actors it is 0, because Ray gives each actor its own CUDA_VISIBLE_DEVICES.

Data parallel: a batch of B sequences (pairs for DPO) is cut into M contiguous shards of
B / M rows (B must be divisible by M), every rank trains on its shard in parallel and
DeepSpeed averages the gradients. The group passes the ``UpdatePlan`` of the global batch
with each shard (minibatch bounds and global loss denominators, see
``PolicyLearner.train_step``), so M ranks x B/M sequences make the same update as one rank x
B sequences for every ``agg_mode``, even with unequal lengths. Metrics are the
mean over ranks; for the loss terms that is exactly the global batch's value.
Every call waits at most ``learner.step_timeout_s``. Ranks are not restarted (their
DeepSpeed state cannot be rebuilt mid-run): a dead or late rank is a ``LearnerFailed`` naming
the rank and the call, the run stops, and ``flywheel train --resume`` continues from the
last checkpoint.

``logprobs`` / ``entropy`` / ``values`` pad B up to a multiple of M (repeating the last row:
under ZeRO-3 every rank must run the same number of forwards), split, and concatenate.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

from services.core.actor_group import ActorGroup, ServiceActor, gather, use_cpu_threads
from services.core.batch_types import TokenBatch
from services.core.config import LearnerConfig
from services.core.errors import ServiceFailure
from services.core.learner_batches import LearnerBatch, tokens_rows
from services.learner.deepspeed_setup import free_port
from services.learner.losses import LossSpec, UpdatePlan, minibatch_count, plan_update
from services.learner.lora import AdapterPayload
from services.learner.policy_learner import PolicyLearner
from services.rollout.weight_sync import PublishedWeights, SharedWeights, shared_weights


class LearnerFailed(ServiceFailure):
    """A learner rank died or did not answer within ``learner.step_timeout_s``."""


class LearnerRank(ServiceActor):
    """A thin Ray actor around one PolicyLearner rank (created empty; ``start`` builds it)."""

    def __init__(self, rank: int, world_size: int):
        self.name = f"learner rank {rank}"
        self.rank, self.world_size = rank, world_size
        self.learner = None

    def address(self) -> tuple[str, int]:
        """This actor's node IP and a port free on it (rank 0's becomes MASTER_ADDR/PORT)."""
        import ray

        return ray.util.get_node_ip_address(), free_port("")

    def start(self, env: dict[str, str], model_dir: str, learner: LearnerConfig, kwargs: dict) -> int:
        os.environ.update(env)
        use_cpu_threads(learner.resources, share=self.world_size)
        self.learner = PolicyLearner(model_dir, learner, **kwargs)
        self.metrics = self.learner.metrics
        return self.rank

    def train_step(self, batch: LearnerBatch, spec: LossSpec, plan: UpdatePlan) -> dict[str, float]:
        return self.learner.train_step(batch, spec, plan)

    def per_token(self, method: str, batch: TokenBatch) -> torch.Tensor:
        return getattr(self.learner, method)(batch)

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        weights = self.learner.export_weights()  # collective under ZeRO-3: every rank calls it
        return weights if self.rank == 0 else None

    def publish_weights(self) -> tuple[SharedWeights | AdapterPayload | None, int]:
        """``export_weights`` as ``SharedWeights`` (LoRA: the adapter alone), with their size;
        called with two returns, so that Ray stores the weights (rank 0's; None elsewhere) in
        its object store from here."""
        if self.learner.cfg.lora is not None:
            adapter = self.learner.export_adapter()  # collective under ZeRO-3
            return (adapter, adapter.nbytes) if self.rank == 0 else (None, 0)
        weights = self.export_weights()
        if weights is None:
            return None, 0
        shared = shared_weights(weights)
        return shared, shared.nbytes

    def save_checkpoint(self, directory: str) -> None:
        self.learner.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> int:
        return self.learner.load_checkpoint(directory)

    def policy_version(self) -> int:
        return self.learner.policy_version


class LearnerGroup(ActorGroup):
    """``learner.num_ranks`` LearnerRank actors with ``learner.resources`` each."""

    def __init__(
        self,
        model_dir: str,
        learner: LearnerConfig,
        *,
        dtype: str | None = None,
        total_steps: int = 1000,
        seed: int = 0,
        trust_remote_code: bool = False,
        placement: list[dict] | None = None,
    ):
        super().__init__()  # max_restarts 0: a rank's DeepSpeed state cannot be rebuilt mid-run
        self.world_size = learner.num_ranks
        self.step_timeout_s = learner.step_timeout_s
        res = learner.resources
        ranks = range(self.world_size)
        self.spawn(LearnerRank, [f"learner rank {rank}" for rank in ranks], [(rank, self.world_size) for rank in ranks],
                   resources=res.ray_options(), placement=placement, wait=False)  # they answer `address` when up
        # start-up (DeepSpeed init, model load) is bounded by the larger of start_timeout_s and the step bound
        start_s = max(self.start_timeout_s, self.step_timeout_s)
        addresses = self._all("address", [actor.address.remote() for actor in self.actors], start_s)
        master_addr, master_port = addresses[0]
        kwargs = {"dtype": dtype, "total_steps": total_steps, "seed": seed, "trust_remote_code": trust_remote_code}
        starts = []
        for rank, actor in enumerate(self.actors):
            node = addresses[rank][0]
            local_rank = 0 if res.num_gpus > 0 else [ip for ip, _ in addresses[:rank]].count(node)
            env = {
                "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            }
            starts.append(actor.start.remote(env, str(model_dir), learner, kwargs))
        self._all("start", starts, start_s)
        self.policy_version = 0
        # calls from the driver's threads reach every rank in one order (ZeRO-3 forwards are collective)
        self._submit = threading.Lock()

    def _all(self, call: str, refs: list, timeout_s: float | None = None) -> list:
        """Every rank's answer to ``call``; a dead or late rank is a LearnerFailed naming it."""
        try:
            return gather(refs, self.names, call, timeout_s or self.step_timeout_s, "learner.step_timeout_s")
        except ServiceFailure as exc:
            raise LearnerFailed(str(exc)) from None

    # ------------------------------------------------------------------ data parallel

    def _shards(self, batch: LearnerBatch, minibatches: int = 1) -> list[LearnerBatch]:
        ptx = getattr(batch, "ptx", None)
        shards = self._row_shards(batch.without_ptx(), minibatches)
        # PPO-ptx rows: their own even split; the plan counts each part's tokens over all ranks
        # (with minibatches, the SFT rows of a part differ from a 1-rank run's; the weighting does not)
        if ptx is not None:
            per = ptx.size // self.world_size
            if per == 0:
                raise ValueError(f"{ptx.size} ptx rows cannot be split over learner.num_ranks={self.world_size}")
            shards = [dataclasses.replace(shard, ptx=tokens_rows(ptx, slice(r * per, (r + 1) * per)))
                      for r, shard in enumerate(shards)]
        return shards

    def _row_shards(self, batch: LearnerBatch, minibatches: int = 1) -> list[LearnerBatch]:
        """Contiguous shards of B / M rows; with n minibatches, rank r's shard is the r-th
        part of each of the n contiguous global minibatches, in order, so the ranks together
        train on the minibatches one rank would (B must then be divisible by n x M)."""
        size, m = batch.size, self.world_size
        if size % m:
            raise ValueError(
                f"a batch of {size} rows cannot be split evenly over learner.num_ranks={m}: "
                "use a batch size divisible by the number of ranks"
            )
        if minibatches > 1 and m > 1:
            if size % (minibatches * m):
                raise ValueError(
                    f"a batch of {size} rows cannot be cut into {minibatches} minibatches split evenly over "
                    f"learner.num_ranks={m}: choose algorithm.ppo_minibatch_size so that it can"
                )
            part = size // minibatches // m
            rows = torch.arange(size).view(minibatches, m, part).transpose(0, 1).reshape(-1)
            batch = batch.take(rows)
        per = size // m
        return [batch.rows(r * per, (r + 1) * per) for r in range(m)]

    def train_step(self, batch: LearnerBatch, spec: LossSpec) -> dict[str, float]:
        """One train step on every rank over its shard, under the plan of the global batch
        (same minibatches and global denominators on every rank); metrics averaged over ranks."""
        shards = self._shards(batch, minibatch_count(batch.size, spec.algorithm.ppo_minibatch_size))
        plan = plan_update(shards, spec)
        results = self._all("train_step", [a.train_step.remote(s, spec, plan) for a, s in zip(self.actors, shards)])
        metrics = {key: sum(r[key] for r in results) / len(results) for key in results[0]}
        self.policy_version = int(results[0]["policy_version"])
        metrics["policy_version"] = self.policy_version
        return metrics

    def _per_token(self, method: str, batch: TokenBatch) -> torch.Tensor:
        size, m = batch.size, self.world_size
        if size == 0:
            return torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        rows = torch.arange(size)
        if size % m:
            rows = torch.cat([rows, rows.new_full(((-size) % m,), size - 1)])
        padded = TokenBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows])
        per = padded.size // m
        with self._submit:
            refs = [a.per_token.remote(method, tokens_rows(padded, slice(r * per, (r + 1) * per)))
                    for r, a in enumerate(self.actors)]
        parts = self._all(method, refs)
        return torch.cat(parts)[:size]

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        return self._per_token("logprobs", batch)

    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """LoRA: the base model's log-probs (``PolicyLearner.reference_logprobs``)."""
        return self._per_token("reference_logprobs", batch)

    def entropy(self, batch: TokenBatch) -> torch.Tensor:
        return self._per_token("entropy", batch)

    def values(self, batch: TokenBatch) -> torch.Tensor:
        return self._per_token("values", batch)

    def response_hidden_sums(self, batch: TokenBatch) -> torch.Tensor:
        """[B, D] (see PolicyLearner.response_hidden_sums); rows split over the ranks."""
        return self._per_token("response_hidden_sums", batch)

    # ------------------------------------------------------------------ collectives

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Every rank takes part (ZeRO-3 gathers collectively); rank 0's copy is returned."""
        return self._all("export_weights", [a.export_weights.remote() for a in self.actors])[0]

    def publish_weights(self) -> PublishedWeights:
        """The current weights in Ray's object store, put there by rank 0 (every rank takes
        part, as in ``export_weights``); for ``RolloutPool.sync_weights``. The driver holds
        only the reference: the weights go from the learner's process to the engines'."""
        weights, sizes = zip(*(a.publish_weights.options(num_returns=2).remote() for a in self.actors))
        nbytes = self._all("publish_weights", list(sizes))[0]  # waits for every rank, names a failed one
        return PublishedWeights(weights[0], nbytes)

    def save_checkpoint(self, directory: str) -> None:
        self._all("save_checkpoint", [a.save_checkpoint.remote(str(directory)) for a in self.actors])

    def load_checkpoint(self, directory: str) -> int:
        versions = self._all("load_checkpoint", [a.load_checkpoint.remote(str(directory)) for a in self.actors])
        self.policy_version = versions[0]
        return self.policy_version
