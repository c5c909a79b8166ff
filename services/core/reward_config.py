"""The ``reward`` section of the config: the ensemble's scorers (``ScorerConfig``, the
fields each kind reads in ``SCORER_FIELDS``), the reward server, the variance report, the
preference model of online IPO, and ``RewardConfig`` around them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from services.core.config_base import Resources, Section, SettingError, _users, check_used
from services.core.judge_settings import judge_problem

# what each scorer kind reads; setting another field is an error. The kinds themselves are
# services.reward.scorers.SCORER_KINDS (a layer above this one); a unit test keeps the kinds
# here, in ScorerConfig.kind and there the same
_VERIFIABLE = {"answer_key", "format_pattern", "format_weight"}
SCORER_FIELDS = {
    kind: {"kind", "name", "weight"} | fields for kind, fields in {
        "toy_gold": set(),
        "toy_noisy_gold": {"noise_std", "seed"},
        "python": {"path", "step_delimiter", "step_reduce"},
        "hf": {"path", "batch_size", "max_length"},
        "remote": {"address", "timeout_s", "retries", "token_env", "member", "max_message_mb", "tls_ca", "tls_cert",
                   "tls_key"},
        "math_verify": _VERIFIABLE | {"extract"},
        "exact_match": _VERIFIABLE | {"normalize"},
        "regex": _VERIFIABLE | {"pattern", "normalize"},
        "judge": {"path", "address", "judge_model", "template", "judge_mode", "score_pattern", "score_range",
                  "judge_max_tokens", "answer_key", "batch_size", "max_length", "timeout_s", "retries", "token_env",
                  "seed"},
    }.items()
}


class ScorerConfig(Section):
    """One reward scorer (an ensemble member). Setting a field that the kind does not use is
    an error (``SCORER_FIELDS``)."""

    kind: Literal[
        "hf", "python", "remote", "toy_gold", "toy_noisy_gold", "math_verify", "exact_match", "regex", "judge"
    ] = "toy_gold"
    path: str | None = Field(
        None, description="hf: model directory; python: 'path/to/file.py:fn' or 'package.module:fn'; judge: a local "
        "judge model directory, served by vLLM inside the member's actor (or address instead)"
    )
    name: str | None = Field(None, description="member name in errors and metrics; default '<kind>-<index>'")
    weight: float = Field(
        1.0, gt=0, description="the member's scores are multiplied by this before reward.aggregate combines them"
    )
    answer_key: str | None = Field(
        "answer", description="math_verify / exact_match / regex / judge: the prompt column holding the reference "
        "answer (regex: null scores 1.0 when the pattern matches at all, a format reward; judge: what {reference} "
        "shows)"
    )
    extract: Literal["auto", "boxed", "number"] = Field(
        "auto", description="math_verify: the completion's answer is the last \\boxed{} or LaTeX/number (auto), "
        "only a \\boxed{} (boxed), or the last number or expression (number; GSM8K's '#### 42')"
    )
    normalize: bool = Field(
        True, description="exact_match / regex: compare case-folded, whitespace-collapsed, with trailing "
        "punctuation and thousands separators removed"
    )
    pattern: str | None = Field(
        None, description="regex: a Python regular expression searched in the completion; its first group (or the "
        "whole match) is the answer"
    )
    format_pattern: str | None = Field(
        None, description="math_verify / exact_match / regex: add format_weight when this regular expression is "
        "found in the completion (a format reward term)"
    )
    format_weight: float = Field(
        0.1, ge=0, lt=1, description="the format term's reward (format_pattern); below 1, so that a score >= 1 "
        "still means a correct answer (pass@k)"
    )
    step_delimiter: str | None = Field(
        None, description="python: a process reward: the function returns, per completion, one score per step (the "
        "pieces of completion.split(step_delimiter)); null: one score per completion"
    )
    step_reduce: Literal["min", "last"] = Field(
        "min", description="python with step_delimiter: the completion's score (what the ensemble aggregates, GRPO "
        "trains on) is its worst step's (min) or its last step's"
    )
    batch_size: int = Field(32, ge=1, description="hf: sequences per forward pass; judge: rubrics per engine call "
                            "or HTTP request")
    max_length: int = Field(1024, gt=0, description="hf: tokens per sequence (truncated on the left); judge with "
                            "path: the engine's context (rubric + answer), at most the model's positions; a longer "
                            "rubric is an error")
    noise_std: float = Field(0.1, ge=0, description="toy_noisy_gold: std of the Gaussian noise on gold")
    seed: int = Field(0, ge=0, description="toy_noisy_gold: noise seed (same sample, same noise); judge: the engine's "
                      "or endpoint's sampling seed (decoding is greedy)")
    address: str | None = Field(None, description="remote: host:port of the reward server; judge: an OpenAI-"
                                "compatible base URL such as http://127.0.0.1:8000/v1 (its /completions)")
    timeout_s: float = Field(30.0, gt=0, description="remote / judge with address: deadline of one request, seconds")
    retries: int = Field(4, ge=0, description="remote: extra attempts when the server is UNAVAILABLE; judge with "
                         "address: extra attempts when the endpoint is unreachable or answers 429 / 5xx")
    token_env: str | None = Field(
        None, description="remote / judge with address: environment variable holding the bearer token (an API key; "
        "null sends none)"
    )
    member: str | None = Field(
        None, description="remote: which of the server's members to use; null uses its aggregate"
    )
    max_message_mb: float = Field(16.0, gt=0, description="remote: largest request or reply, MiB")
    tls_ca: str | None = Field(
        None, description="remote: PEM bundle of the CA that signed the server's certificate; set, the client speaks "
        "TLS (null: plaintext)"
    )
    tls_cert: str | None = Field(None, description="remote: the client's PEM certificate, for a server that asks "
                                 "for one (mutual TLS; needs tls_key and tls_ca)")
    tls_key: str | None = Field(None, description="remote: the client certificate's PEM private key")
    judge_model: str | None = Field(None, description="judge with address: the model name the endpoint serves")
    template: str | None = Field(
        None, description="judge: the rubric, a string with {prompt}, {completion} and (compare mode; optional in "
        "grade mode) {reference} placeholders, or a file holding one; sent as-is (a raw completion, not a chat). "
        "null: a built-in rubric asking for 'Score: N' on 1-10 (grade) or 'Winner: A|B|tie' (compare)"
    )
    judge_mode: Literal["grade", "compare"] = Field(
        "grade", description="judge: grade the completion on score_range, or compare it (answer A) with the "
        "reference answer (answer B): A wins 1.0, B wins 0.0, tie 0.5"
    )
    score_pattern: str | None = Field(
        None, description="judge: a regular expression whose first group captures the score (grade) or the verdict "
        "A / B / tie (compare) in the judge's answer; its last match counts. null: 'Score: N' / 'Winner: X', any case"
    )
    score_range: tuple[float, float] = Field(
        (1.0, 10.0), description="judge, grade mode: [lo, hi] of the judge's scores, mapped to [0, 1]; a score "
        "outside it is an error"
    )
    judge_max_tokens: int = Field(16, ge=1, description="judge: tokens the judge may answer with")

    @model_validator(mode="after")
    def _required_fields(self) -> "ScorerConfig":
        used = SCORER_FIELDS[self.kind]
        check_used(self, self.kind, used, _users(SCORER_FIELDS))
        if self.kind == "judge":  # its path and address differ from the other kinds'
            problem = judge_problem(self)
            if problem:
                raise SettingError(*problem)
            return self
        # path and address have no default: a kind that reads one needs it
        if "path" in used and not self.path:
            raise ValueError(f"kind '{self.kind}' needs path")
        if self.step_delimiter == "":
            raise ValueError("step_delimiter is empty: give the string that ends a step (for example '\\n'), or null")
        if self.kind == "regex" and not self.pattern:
            raise ValueError("kind 'regex' needs pattern")
        if self.kind in ("math_verify", "exact_match") and not self.answer_key:
            raise ValueError(f"kind '{self.kind}' needs answer_key (the column with the reference answers)")
        for key in ("pattern", "format_pattern"):
            if key in used and getattr(self, key):
                try:
                    re.compile(getattr(self, key))
                except re.error as exc:
                    raise ValueError(f"{key} is not a valid regular expression: {exc}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (the client's certificate and its key)")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("tls_cert needs tls_ca (the CA that signed the server's certificate)")
        if "address" in used:
            host, _, port = (self.address or "").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"kind '{self.kind}' needs address as host:port (got {self.address!r})")
        return self


class RewardServerConfig(Section):
    """``flywheel serve-reward``: the gRPC reward server (protos/flywheel/reward/v1)."""

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes it to the network")
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    token_env: str | None = Field(
        "FLYWHEEL_REWARD_TOKEN",
        description="environment variable holding the bearer token clients must send; unset or empty: no token",
    )
    allow_unauthenticated: bool = Field(
        False, description="serve on a non-loopback host without a token (refused otherwise)"
    )
    max_message_mb: float = Field(16.0, gt=0, description="largest request or reply, MiB")
    max_workers: int = Field(4, ge=1, description="requests handled at once")
    tls_cert: str | None = Field(
        None, description="PEM certificate (chain) the server presents; with tls_key it speaks TLS only"
    )
    tls_key: str | None = Field(None, description="the server certificate's PEM private key")
    tls_client_ca: str | None = Field(
        None, description="PEM bundle of the CA that signs the clients' certificates; set, every client must present "
        "one (mutual TLS, which also counts as authentication on a non-loopback host)"
    )

    @model_validator(mode="after")
    def _tls_files(self) -> "RewardServerConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (the server's certificate and its key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
        return self


class RewardVarianceConfig(Section):
    """Reward variance under a policy (Razin et al. 2025), measured by ``flywheel eval-rm``."""

    prompts: int = Field(64, ge=1, description="prompts to sample from the policy")
    samples: int = Field(8, ge=2, description="responses per prompt (n)")
    threshold: float = Field(0.01, ge=0, description="report the fraction of prompts whose variance is below this")


class PreferenceConfig(Section):
    """A pairwise preference model P(a preferred to b | prompt), for ``online_ipo``."""

    kind: Literal["bt", "python"] = Field(
        "bt", description="bt: sigmoid((r(a) - r(b)) / temperature) from the rewards trained on (Bradley-Terry over "
        "reward.scorers); python: path's function(prompts, completions_a, completions_b, **columns) -> P(a > b) each"
    )
    path: str | None = Field(None, description="python: 'path/to/file.py:fn' or 'package.module:fn'")
    temperature: float = Field(1.0, gt=0, description="bt: the reward difference is divided by this")

    @model_validator(mode="after")
    def _path_for_python(self) -> "PreferenceConfig":
        if self.kind == "python" and not self.path:
            raise ValueError("kind 'python' needs path")
        if self.kind == "bt" and self.path:
            raise ValueError("kind 'bt' reads no path (it compares the reward ensemble's scores)")
        return self


class RewardConfig(Section):
    scorers: list[ScorerConfig] = Field(default_factory=lambda: [ScorerConfig()], min_length=1)
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="online_ipo: the preference model that compares two samples"
    )
    aggregate: Literal["mean", "wco", "uwo"] = "mean"
    uwo_lambda: float = Field(1.0, ge=0)
    replicas: int = Field(1, ge=1, description="copies of the whole ensemble; requests go round-robin")
    resources: Resources = Field(default_factory=Resources)
    server: RewardServerConfig = Field(default_factory=RewardServerConfig)
    timeout_s: float = Field(
        300.0, gt=0, description="a member that returns no scores for a batch this long is killed, restarted and "
        "asked again (a remote scorer's own deadline is scorers[].timeout_s)"
    )
    max_restarts: int = Field(
        3, ge=0, description="times Ray restarts a dead or stuck member; the batch is scored again, "
        "0 makes a death or timeout fail the step"
    )
    variance: RewardVarianceConfig = Field(default_factory=RewardVarianceConfig)
    overlong_buffer: int = Field(
        0, ge=0, description="RL: DAPO's soft overlong penalty over the last N tokens before rollout.max_tokens, "
        "added to every trained-on reward (0: off)"
    )
    overlong_factor: float = Field(1.0, ge=0, description="the overlong penalty at rollout.max_tokens (-factor)")

    @model_validator(mode="after")
    def _unique_names(self) -> "RewardConfig":
        names = [s.name or f"{s.kind}-{i}" for i, s in enumerate(self.scorers)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scorer names must be unique, repeated: {', '.join(dupes)}")
        return self
