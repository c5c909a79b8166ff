"""The RL learner: a DeepSpeed engine around a HF causal LM (and an optional critic).

``PolicyLearner`` is a plain class (no Ray) holding one data-parallel rank. In a process of
its own it is a world of one; ``services.learner.group.LearnerGroup`` runs M of them as Ray
actors with the torch.distributed environment set for each.

- CPU: DeepSpeed's CPU accelerator, gloo, fp32 (or bf16); fp16 is a UserError.
- GPU: NCCL and bf16 by default (written to DeepSpeed's documented API, not yet run on a GPU).

One ``train_step`` is one optimizer step over the whole given batch, or, with PPO
minibatches (``algorithm.ppo_epochs`` / ``ppo_minibatch_size``), one per minibatch and
epoch. Within an optimizer step, micro-batches of ``learner.micro_batch_size`` are
accumulated with DeepSpeed's unmanaged gradient accumulation
(``managed_gradient_accumulation: false``: any number of ``backward`` calls, then one
``step``), each micro-batch's loss weighted as in ``services.learner.losses``. With
``learner.packing`` the micro-batches are token-budget bins of sequences instead
(``learner.max_tokens_per_micro_batch``), each run as one packed row with no padding
(``services.core.packing``); per-token outputs are put back in the padded layout, so the
losses and weights are the padded path's.

The critic (``learner.critic: true``) is the policy's backbone loaded as
``AutoModelForTokenClassification`` with one label (a zero-initialised linear value head on
the last hidden state) in a DeepSpeed engine of its own, so it works under every ZeRO stage
like any HF model. ``values[:, t]`` is V(state before token t), aligned like log-probs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from services.core.batch_types import TokenBatch
from services.core.config import LearnerConfig, packing_budget
from services.core.errors import UserError
from services.core.rl_math import TORCH_DTYPES, response_hidden_sum
from services.core.service_metrics import ServiceMetrics
from services.learner.deepspeed_setup import default_dtype, hf_state_dict, init_engine
from services.learner.lora import AdapterPayload, adapter_payload, merged_state_dict, wrap_lora
from services.core.learner_batches import LearnerBatch, PairBatch, tokens_rows, trim_tokens
from services.core.packing import pack_bins, pack_row, row_bins
from services.learner.losses import (
    LossSpec,
    UpdatePlan,
    micro_weight,
    pair_terms,
    per_token_entropy,
    per_token_logprobs,
    per_token_values,
    plan_update,
    policy_token_terms,
    response_logps,
    token_outputs,
    value_terms,
)


def load_policy(model_dir: str, dtype: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    if not Path(model_dir).expanduser().is_dir():
        raise UserError(f"learner: no model directory at '{model_dir}'")
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code
    )


def load_critic(model_dir: str, dtype: str, trust_remote_code: bool = False):
    """The policy's backbone with a 1-output token-classification head (zero-initialised,
    no dropout): a value model that DeepSpeed treats like any HF model (ZeRO-3 included)."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is "newly initialised": expected, not news
    try:
        critic = AutoModelForTokenClassification.from_pretrained(
            model_dir, config=config, dtype=TORCH_DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    for name in ("score", "classifier"):
        head = getattr(critic, name, None)
        if isinstance(head, torch.nn.Linear):
            torch.nn.init.zeros_(head.weight)
            if head.bias is not None:
                torch.nn.init.zeros_(head.bias)
    return critic


class PolicyLearner:
    """One data-parallel rank of the policy (and critic) learner.

    ``total_steps`` sizes the warmup + cosine learning-rate schedule (optimizer steps, i.e.
    train_step calls). The torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) is read from os.environ; unset, it is a world of one.
    """

    def __init__(
        self,
        model_dir: str,
        learner: LearnerConfig,
        *,
        dtype: str | None = None,
        total_steps: int = 1000,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        self.cfg = learner
        self.dtype = default_dtype(dtype)  # fp16 on CPU fails here, before any loading
        self.rank = int(os.environ.get("RANK", 0))
        self.metrics = ServiceMetrics(service="learner", replica=self.rank)
        torch.manual_seed(seed)
        model = load_policy(model_dir, self.dtype, trust_remote_code)
        if learner.lora is not None:  # only the adapter trains (init_engine optimizes trainable parameters)
            model = wrap_lora(model, learner.lora)
        self.engine = init_engine(model, learner, self.dtype, total_steps, managed_accumulation=False)
        self.critic_engine = None
        if learner.critic:
            critic = load_critic(model_dir, self.dtype, trust_remote_code)
            self.critic_engine = init_engine(
                critic, learner, self.dtype, total_steps, lr=learner.critic_lr, managed_accumulation=False
            )
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.policy_version = 0

    # ------------------------------------------------------------------ inference

    def _bins(self, lengths: list[int]) -> list[torch.Tensor]:
        """Row indices of each micro-batch: runs of ``learner.micro_batch_size`` rows or, with
        ``learner.packing``, token-budget bins (``pack_bins``). With several ranks every rank
        makes as many packed micro-batches as the one that needs the most (ZeRO-2/3 reduce
        gradients in every backward and ZeRO-3 gathers weights in every forward, so the ranks'
        calls must pair up); the ranks' batches have equal row counts, so that always fits."""
        if not self.cfg.packing:
            bins = row_bins(len(lengths), self.cfg.micro_batch_size)
        else:
            bins = pack_bins(lengths, packing_budget(self.cfg))
            if self.world_size > 1:
                count = torch.tensor([len(bins)], device=self.engine.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                bins = pack_bins(lengths, packing_budget(self.cfg), min_bins=int(count.item()))
        return [torch.tensor(b, dtype=torch.long) for b in bins]

    def _run(self, engine, tokens: TokenBatch, causal_lm: bool = True, **kwargs):
        """The model output on one micro-batch, the input ids in the output's layout, and the
        map of per-position values to the micro-batch's [b, T] (``PackedRow.unpack``; padded:
        as they are). Packed: one row, no attention mask, position ids restarting at 0 per
        sequence, from which transformers builds the block-diagonal causal mask (needs no KV
        cache: ``use_cache=False``, for the critic too)."""
        if not self.cfg.packing:
            out = engine(input_ids=tokens.input_ids.to(engine.device),
                         attention_mask=tokens.attention_mask.to(engine.device),
                         **({"use_cache": False} if causal_lm else {}), **kwargs)
            return out, tokens.input_ids.to(engine.device), lambda values, shifted=True: values
        packed = pack_row(tokens.input_ids, tokens.attention_mask)
        out = engine(input_ids=packed.input_ids.to(engine.device), position_ids=packed.position_ids.to(engine.device),
                     use_cache=False, **kwargs)
        return out, packed.input_ids.to(engine.device), packed.unpack

    def _response_logps(self, engine, tokens: TokenBatch) -> torch.Tensor:
        """Summed response-token log-probs per row [b] of one micro-batch."""
        out, ids, to_rows = self._run(engine, tokens)
        return response_logps(to_rows(per_token_logprobs(out.logits, ids)), tokens)

    def _no_grad(self, engine, batch: TokenBatch, fn) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, fn(micro TokenBatch)) for the micro-batches (``_bins``; each trimmed to its
        longest row), in eval mode under no_grad; float, on CPU."""
        engine.eval()
        with torch.no_grad():
            return [(rows, fn(trim_tokens(tokens_rows(batch, rows))).float().cpu())
                    for rows in self._bins(batch.attention_mask.sum(dim=1).tolist())]

    def _per_token(self, engine, batch: TokenBatch, fn, causal_lm: bool = True) -> torch.Tensor:
        """fn(model output, input ids as it saw them, map to [b, t], micro TokenBatch) -> [b, t],
        micro-batched, eval mode, no grad. Zero at position 0 and on padding."""
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for rows, values in self._no_grad(engine, batch, lambda micro: fn(*self._run(engine, micro, causal_lm), micro)):
            out[rows, : values.shape[1]] = values
        valid = batch.attention_mask.bool().clone()
        valid[:, 0] = False
        return torch.where(valid, out, torch.zeros(()))

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """Per-token log-probs [B, T] of the current policy (batch_types alignment)."""
        with self.metrics.track("logprobs"):
            return self._per_token(
                self.engine, batch, lambda out, ids, to_rows, mb: to_rows(per_token_logprobs(out.logits, ids))
            )

    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """LoRA: the frozen base model's per-token log-probs [B, T] (the adapter disabled), the
        reference policy served without a copy of the model."""
        if self.cfg.lora is None:
            raise RuntimeError("reference_logprobs() needs learner.lora: without it the reference is a model of its own")
        with self.engine.module.disable_adapter():
            return self.logprobs(batch)

    def entropy(self, batch: TokenBatch) -> torch.Tensor:
        """Per-token entropy [B, T] of the distribution each token was drawn from."""
        with self.metrics.track("entropy"):
            return self._per_token(self.engine, batch, lambda out, ids, to_rows, mb: to_rows(per_token_entropy(out.logits)))

    def response_hidden_sums(self, batch: TokenBatch) -> torch.Tensor:
        """[B, D]: per row, the sum of the last layer's hidden states that predict the response
        tokens (``rl_math.response_hidden_sum``), for CHES scores."""
        def hidden_sums(micro: TokenBatch) -> torch.Tensor:
            out, _, to_rows = self._run(self.engine, micro, output_hidden_states=True)
            return response_hidden_sum(to_rows(out.hidden_states[-1], shifted=False).float().cpu(), micro.response_mask)

        with self.metrics.track("hidden_sums"):
            parts = self._no_grad(self.engine, batch, hidden_sums)
            if not parts:
                return torch.zeros((0, 0))
            sums = torch.zeros((batch.size, parts[0][1].shape[-1]))
            for rows, part in parts:
                sums[rows] = part
            return sums

    def values(self, batch: TokenBatch) -> torch.Tensor:
        """Critic values [B, T]: V(state before token t) at position t."""
        with self.metrics.track("values"):
            if self.critic_engine is None:
                raise RuntimeError("values() needs a critic: set learner.critic: true")
            return self._per_token(
                self.critic_engine, batch, lambda out, ids, to_rows, mb: to_rows(per_token_values(out.logits)),
                causal_lm=False,
            )

    # ------------------------------------------------------------------ training

    def train_step(self, batch: LearnerBatch, spec: LossSpec, plan: UpdatePlan | None = None) -> dict[str, float]:
        """One train step of the policy (and of the critic when the batch has ``returns``):
        ``plan.optimizer_steps`` optimizer steps, ``spec.algorithm.ppo_epochs`` passes over the batch's
        minibatches (one step over the whole batch by default). Returns ``train/*`` metrics,
        each the mean over the optimizer steps, and ``policy_version`` (+1 per train step).

        ``batch``: a ``PolicyBatch`` (ppo kind; sft: ``tokens`` only) or a ``PairBatch``
        (dpo), see ``services.core.learner_batches``.

        Normalisation: without ``plan`` the loss is aggregated over this rank's batch. The
        group passes the plan of the global batch (``plan_update`` of all shards): each
        micro-batch is then weighted by count / global minibatch count x world size, which
        makes DeepSpeed's averaged gradient exactly that of the global minibatch, whatever
        the sequence lengths on each rank.
        """
        with self.metrics.track("train_step"):
            if batch.size == 0:
                raise ValueError("train_step got an empty batch")
            plan = plan or plan_update([batch], spec)
            ptx = getattr(batch, "ptx", None)
            rows = batch.without_ptx()
            with_critic = self.critic_engine is not None and spec.kind == "ppo" and getattr(batch, "returns", None) is not None
            steps: list[dict] = []
            for _ in range(plan.epochs):
                for k, (start, stop) in enumerate(plan.bounds):
                    minibatch = rows.rows(start, stop)
                    ptx_part = None
                    if ptx is not None and spec.algorithm.ptx_coef:
                        ptx_part = (tokens_rows(ptx, slice(*plan.ptx_bounds[k])), plan.ptx_denominators[k])
                    metrics = self._step(self.engine, minibatch, spec, plan.denominators[k], plan.scale,
                                         critic=False, ptx=ptx_part)
                    if with_critic:
                        critic_metrics = self._step(self.critic_engine, minibatch, spec, plan.denominators[k],
                                                    plan.scale, critic=True)
                        metrics["train/critic_grad_norm"] = critic_metrics.pop("train/grad_norm")
                        critic_metrics.pop("train/lr")
                        metrics.update(critic_metrics)
                    steps.append(metrics)
            metrics = {key: sum(m[key] for m in steps) / len(steps) for key in steps[0]}
            metrics["train/lr"] = steps[0]["train/lr"]
            if plan.optimizer_steps > 1:
                metrics["train/optimizer_steps"] = float(plan.optimizer_steps)
            self.policy_version += 1
            self.metrics.set_policy_version(self.policy_version)
            metrics["policy_version"] = self.policy_version
            return metrics

    def _step(self, engine, batch: LearnerBatch, spec: LossSpec, denominator: float, scale: float, critic: bool,
              ptx: tuple[TokenBatch, float] | None = None) -> dict:
        """One optimizer step of ``engine`` over ``batch`` (micro-batched); ``ptx``: SFT rows and
        their response-token count over all ranks (PPO-ptx)."""
        engine.train()
        lr = float(engine.get_lr()[0])
        sums: dict[str, float] = defaultdict(float)
        if isinstance(batch, PairBatch):  # a pair's tokens: both of its sequences
            lengths = (batch.chosen.attention_mask.sum(dim=1) + batch.rejected.attention_mask.sum(dim=1)).tolist()
        else:
            lengths = batch.tokens.attention_mask.sum(dim=1).tolist()
        for rows in self._bins(lengths):
            micro = batch.take(rows).trim()
            weight = micro_weight(micro, spec, denominator) * scale
            if critic:
                out, _, to_rows = self._run(engine, micro.tokens, causal_lm=False)
                loss, stats = value_terms(to_rows(per_token_values(out.logits)), micro, spec)
            elif isinstance(micro, PairBatch):
                loss, stats = pair_terms(self._response_logps(engine, micro.chosen),
                                         self._response_logps(engine, micro.rejected), micro, spec)
            else:
                out, ids, to_rows = self._run(engine, micro.tokens)
                logprobs, entropy = token_outputs(out.logits, ids, spec)
                loss, stats = policy_token_terms(to_rows(logprobs), to_rows(entropy), micro, spec)
            # every micro-batch runs forward and backward (even at weight 0): under ZeRO-3
            # the ranks must make the same collective calls
            engine.backward(loss * weight, scale_wrt_gas=False)
            for key, value in stats.items():
                sums[key] += weight * float(value)
        if ptx is not None:
            # PPO-ptx (Ouyang et al. 2022): + ptx_coef x token-mean NLL of the SFT rows
            rows, ptx_denominator = ptx
            for part in self._bins(rows.attention_mask.sum(dim=1).tolist()):
                micro_ptx = trim_tokens(tokens_rows(rows, part))
                nll = -self._response_logps(engine, micro_ptx).sum() / max(float(ptx_denominator), 1.0)
                engine.backward(spec.algorithm.ptx_coef * nll * scale, scale_wrt_gas=False)
                sums["ptx_nll"] += float(nll.detach()) * scale
        engine.step()
        metrics = {f"train/{key}": value for key, value in sums.items()}
        norm = engine.get_global_grad_norm()
        metrics["train/grad_norm"] = float(norm) if norm is not None else float("nan")
        metrics["train/lr"] = lr
        return metrics

    # ------------------------------------------------------------------ weights, checkpoints

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Full policy weights, HF names as in model.safetensors, CPU fp32 contiguous (LoRA:
        the adapter merged in). Collective under multi-rank ZeRO-3: every rank must call it."""
        with self.metrics.track("export_weights"):
            weights = hf_state_dict(self.engine)
            return weights if self.cfg.lora is None else merged_state_dict(weights, self.cfg.lora.scaling)

    def export_adapter(self) -> AdapterPayload:
        """LoRA: the adapter alone, as the rollout engines load it (collective under ZeRO-3)."""
        with self.metrics.track("export_weights"):
            return adapter_payload(self.engine, self.cfg.lora)

    def save_checkpoint(self, directory: str | Path) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler) of policy and critic, plus
        the policy version. Collective: with several ranks every rank must call it."""
        with self.metrics.track("save_checkpoint"):
            tag = f"version-{self.policy_version}"
            state = {"policy_version": self.policy_version, "torch_rng": torch.get_rng_state()}
            self.engine.save_checkpoint(str(Path(directory) / "policy"), tag=tag, client_state=state)
            if self.critic_engine is not None:
                self.critic_engine.save_checkpoint(str(Path(directory) / "critic"), tag=tag, client_state=state)

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore what ``save_checkpoint`` wrote (latest tag); returns the policy version."""
        with self.metrics.track("load_checkpoint"):
            path, state = self.engine.load_checkpoint(str(Path(directory) / "policy"))
            if path is None:
                raise UserError(f"checkpoint: no learner checkpoint in '{directory}'")
            if self.critic_engine is not None:
                critic_path, _ = self.critic_engine.load_checkpoint(str(Path(directory) / "critic"))
                if critic_path is None:
                    raise UserError(f"checkpoint: learner.critic is on but '{directory}' has no critic checkpoint")
            self.policy_version = int(state["policy_version"])
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"])
            self.metrics.set_policy_version(self.policy_version)
            return self.policy_version

    def metrics_text(self) -> str:
        return self.metrics.exposition()
