"""Reference log-probs: the frozen initial policy (``ReferenceServer``) and R Ray replicas of
it (``ReferencePool``); with ``learner.lora``, the learner's own model with its adapter
disabled (``LearnerReference``: no second copy of the model).

A plain HF causal LM in eval mode under no_grad (no DeepSpeed: nothing trains here). The
log-probs are those of ``PolicyLearner.logprobs`` for the same weights (same alignment,
same ``per_token_logprobs``), which is what the KL terms compare against. With
``reference.packing`` a request is cut into token-budget bins, each run as one packed row
(``services.core.packing``), like the learner's ``learner.packing``.
"""

from __future__ import annotations

from pathlib import Path
import torch

from services.core.batch_types import TokenBatch, pack_sequences, response_values
from services.core.config import ReferenceConfig, packing_budget
from services.core.errors import UserError
from services.core.actor_group import ActorGroup, ServiceActor, use_cpu_threads
from services.core.packing import pack_bins, pack_row
from services.core.rl_math import TORCH_DTYPES
from services.core.service_metrics import ServiceMetrics
from services.learner.losses import per_token_logprobs


class ReferenceServer(ServiceActor):
    """Per-token log-probs of response tokens under the frozen model in ``model_dir`` (Ray
    actor body, named ``reference-<replica>``; also usable directly).

    dtype None means bf16 on a GPU and fp32 on CPU (fp16 only on a GPU).
    """

    def __init__(
        self,
        model_dir: str,
        reference: ReferenceConfig,
        *,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        replica: int = 0,
    ):
        from transformers import AutoModelForCausalLM

        self.name = f"reference-{replica}"
        self.cfg = reference
        use_cpu_threads(reference.resources, share=reference.replicas)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        if dtype == "fp16" and self.device.type == "cpu":
            raise UserError("model.dtype: fp16 is not supported on CPU; use fp32 or bf16")
        if not Path(model_dir).expanduser().is_dir():
            raise UserError(f"reference: no model directory at '{model_dir}'")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        pad = self.model.config.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0  # only padding positions see it
        self.metrics = ServiceMetrics(service="reference", replica=replica)

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """log p(response token | prompt, earlier response tokens), one list per response."""
        with self.metrics.track("logprobs"):
            order = length_order(prompt_ids, response_ids)
            lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
            if self.cfg.packing:
                groups = pack_bins(lengths, packing_budget(self.cfg))
            else:  # micro-batches of similar lengths pad less
                step = self.cfg.micro_batch_size
                groups = [order[start : start + step] for start in range(0, len(order), step)]
            out: list[list[float]] = [[] for _ in lengths]  # in request order
            for idx in groups:
                batch = pack_sequences([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], self.pad_id)
                for i, row in zip(idx, response_values(self.token_logprobs(batch), batch)):
                    out[i] = row
            return out

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """Per-token log-probs [B, T] of a right-padded batch (batch_types alignment), one
        forward: of the padded rows, or (``reference.packing``) of one packed row."""
        if self.cfg.packing:
            packed = pack_row(batch.input_ids, batch.attention_mask)
            ids = packed.input_ids.to(self.device)
            logits = self.model(input_ids=ids, position_ids=packed.position_ids.to(self.device), use_cache=False).logits
            return packed.unpack(per_token_logprobs(logits, ids).float()).cpu()
        logits = self.model(
            input_ids=batch.input_ids.to(self.device),
            attention_mask=batch.attention_mask.to(self.device),
            use_cache=False,
        ).logits
        return per_token_logprobs(logits, batch.input_ids.to(self.device)).float().cpu()


def length_order(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[int]:
    """Request rows by total length (micro-batches of similar lengths pad less; results go back
    in request order), after checking the request."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first token has no log-prob)")
    return sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))


class LearnerReference:
    """The reference of a LoRA run: the learner's frozen base model, its adapter disabled
    (``learner.reference_logprobs``, micro-batched as the learner's own log-probs). The base
    weights never train, so this is the initial policy, as a ``ReferenceServer`` would load it,
    without a second copy of the model in memory. No actors of its own: the learner's ranks
    answer (its failures are the learner's)."""

    def __init__(self, learner, pad_id: int):
        self.learner, self.pad_id = learner, pad_id

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        order = length_order(prompt_ids, response_ids)
        if not order:
            return []
        batch = pack_sequences([prompt_ids[i] for i in order], [response_ids[i] for i in order], self.pad_id)
        out: list[list[float]] = [[] for _ in order]
        for i, row in zip(order, response_values(self.learner.reference_logprobs(batch), batch)):
            out[i] = row
        return out

    def wait_ready(self) -> None:
        pass

    def count_quiet_restarts(self) -> int:
        return 0

    def metrics_texts(self) -> list[str]:
        return []  # the learner's ranks report the calls (method="reference_logprobs")

    def shutdown(self) -> None:
        pass  # the learner is shut down as itself


class ReferencePool(ActorGroup):
    """``reference.replicas`` Ray actors of ReferenceServer with ``reference.resources``; a
    request is split into contiguous chunks, one per replica, and reassembled in order. A
    replica that dies or is stuck past ``reference.timeout_s`` is restarted by Ray
    (``reference.max_restarts``) and its chunk is sent again."""

    def __init__(self, model_dir: str, reference: ReferenceConfig, *, dtype: str | None = None,
                 trust_remote_code: bool = False, placement: list[dict] | None = None, wait: bool = True):
        super().__init__(max_restarts=reference.max_restarts, restarts_setting="reference.max_restarts")
        self.cfg = reference
        r = reference.replicas
        self.spawn(ReferenceServer, [f"reference-{i}" for i in range(r)], [(str(model_dir), reference)] * r,
                   kwargs=[{"dtype": dtype, "trust_remote_code": trust_remote_code, "replica": i} for i in range(r)],
                   resources=reference.resources.ray_options(), placement=placement, wait=wait)

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        n = len(prompt_ids)
        per = -(-n // len(self.actors)) if n else 0
        chunks = [(prompt_ids[start : start + per], response_ids[start : start + per]) for start in range(0, n, per or 1)]

        parts = self.call_supervised(range(len(chunks)), lambda i: self.actors[i].logprobs.remote(*chunks[i]),
                                     "logprobs", self.cfg.timeout_s, "reference.timeout_s")
        return [row for part in parts for row in part]
