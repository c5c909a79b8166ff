"""Reward scorers: one ensemble member each, all with ``score(prompts, completions, columns)``.

Kinds (``ScorerConfig.kind``):

- ``hf``: a Hugging Face reward model (``AutoModelForSequenceClassification``,
  ``num_labels=1``) from a local directory, fp32, eval, no grad, batched;
- ``python``: ``path/to/file.py:fn`` or ``package.module:fn``, called as
  ``fn(prompts, completions, **columns) -> list[float]`` (verifiable rewards);
- ``remote``: a gRPC reward server (``flywheel serve-reward``, protos/flywheel/reward/v1) at
  ``address``: its aggregate, or the member named by ``member``; bearer token from the
  environment variable ``token_env`` (see :mod:`services.reward.grpc_client`);
- ``math_verify``, ``exact_match``, ``regex``: verifiable rewards against a prompt column
  (services/reward/verifiable.py);
- ``toy_gold``: the toy world's hidden gold reward;
- ``toy_noisy_gold``: gold + N(0, noise_std²) noise fixed per (seed, prompt, completion), a
  stand-in for imperfect learned reward models in an ensemble;
- ``judge``: an LLM judge (RLAIF) grading the completion with a rubric, or comparing it with a
  reference answer, served by a local vLLM engine or an OpenAI-compatible endpoint
  (services/reward/judge.py).

Every score is validated (length N, finite) by :meth:`Scorer.score`; a bad output raises
:class:`ScorerOutputError` naming the scorer and the first bad index.

Each kind is a :class:`Scorer` subclass registered by name in :data:`SCORER_KINDS`
(``@SCORER_KINDS.register("kind")``); :func:`build_scorer` looks ``ScorerConfig.kind`` up
there, and the class says how to check its config (``resolve``), build itself
(``from_config``) and what its actor needs from this process's environment (``actor_env``).
The settings each kind reads are declared in ``services.core.config.SCORER_FIELDS`` (the
config layer does not import this one); a unit test keeps the two lists of kinds equal.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.core.config import ScorerConfig
from services.core.errors import UserError
from services.core.model_files import check_model_files
from services.core.registry import Registry
from services.core.special_tokens import require_padding
from services.core.toy_world import gold_reward
from services.reward.process_steps import reduce_steps, split_steps

Columns = dict[str, Sequence[Any]]


class ScorerOutputError(ValueError):
    """A scorer returned the wrong number of scores or a non-finite one."""


class ScorerError(RuntimeError):
    """A scorer's own code raised while scoring (for a python scorer: the user's function)."""


def scorer_name(cfg: ScorerConfig, index: int) -> str:
    return cfg.name or f"{cfg.kind}-{index}"


def validate_scores(name: str, scores: Any, n: int) -> list[float]:
    """``scores`` as a list of n finite floats, else ScorerOutputError naming ``name``."""
    if hasattr(scores, "tolist"):  # numpy array or torch tensor
        scores = scores.tolist()
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise ScorerOutputError(
            f"reward scorer '{name}': expected a list of {n} floats, got {type(scores).__name__}"
        )
    if len(scores) != n:
        raise ScorerOutputError(
            f"reward scorer '{name}': wrong number of scores: expected {n}, got {len(scores)}"
        )
    out = []
    for i, value in enumerate(scores):
        if isinstance(value, (str, bytes)):  # float("1.0") would pass: a number (bools count as 0 and 1) or nothing
            raise ScorerOutputError(
                f"reward scorer '{name}': score at index {i} is a {type(value).__name__}, not a number: {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ScorerOutputError(f"reward scorer '{name}': score at index {i} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise ScorerOutputError(f"reward scorer '{name}': score at index {i} is not finite: {number!r}")
        out.append(number)
    return out


class Scorer:
    """Base class: subclasses implement ``compute``; ``score`` checks inputs and outputs.

    The class methods take the member's ``ScorerConfig`` and ``field`` (``reward.scorers.N``,
    the prefix of every error about it)."""

    verifiable = False  # scores a correct answer >= 1 (pass@k during evaluation counts those)

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def resolve(cls, cfg: ScorerConfig, field: str) -> ScorerConfig:
        """``cfg`` checked cheaply (nothing heavy loaded, no server contacted), with absolute
        paths, ready to ship to an actor in another process."""
        return cfg

    @classmethod
    def from_config(cls, cfg: ScorerConfig, name: str, field: str) -> "Scorer":
        """The scorer named ``name`` for a resolved ``cfg``."""
        return cls(name)

    @classmethod
    def columns_needed(cls, cfg: ScorerConfig) -> list[str]:
        """Prompt columns it reads, which every RL prompt must have (checked when they load)."""
        return []

    @classmethod
    def actor_env(cls, cfg: ScorerConfig) -> dict[str, str]:
        """Environment variables its actor needs from this process (Ray actors don't see ours)."""
        return {}

    def compute(self, prompts: list[str], completions: list[str], columns: Columns) -> Any:
        raise NotImplementedError

    def score(self, prompts: Sequence[str], completions: Sequence[str], columns: Columns | None = None) -> list[float]:
        prompts, completions, columns = self.checked_inputs(prompts, completions, columns)
        if not prompts:
            return []
        return validate_scores(self.name, self.compute(prompts, completions, columns), len(prompts))

    def checked_inputs(self, prompts: Sequence[str], completions: Sequence[str],
                       columns: Columns | None) -> tuple[list[str], list[str], Columns]:
        """As lists, with as many completions and column values as prompts (ValueError otherwise)."""
        prompts, completions, columns = list(prompts), list(completions), dict(columns or {})
        if len(prompts) != len(completions):
            raise ValueError(f"reward scorer '{self.name}': {len(prompts)} prompts but {len(completions)} completions")
        for key, values in columns.items():
            if len(values) != len(prompts):
                raise ValueError(
                    f"reward scorer '{self.name}': column '{key}' has {len(values)} values for {len(prompts)} samples"
                )
        return prompts, completions, columns

    def score_steps(
        self, prompts: Sequence[str], completions: Sequence[str], columns: Columns | None = None
    ) -> tuple[list[float], list[list[float]] | None]:
        """(``score``'s scores, per-step scores or None): a process-reward member returns both."""
        return self.score(prompts, completions, columns), None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# kind name -> Scorer subclass: the kinds of this module, the verifiable ones
# (services/reward/verifiable.py) and the LLM judge (services/reward/judge.py), those two
# imported on the first lookup
SCORER_KINDS: Registry[type[Scorer]] = Registry(
    "reward scorer kind", "reward.scorers[].kind", modules=("services.reward.verifiable", "services.reward.judge")
)


@SCORER_KINDS.register("toy_gold")
class ToyGoldScorer(Scorer):

    def compute(self, prompts, completions, columns):
        return gold_reward(prompts, completions)


def sample_noise(seed: int, prompt: str, completion: str, std: float) -> float:
    """N(0, std²) noise fixed by (seed, prompt, completion): same sample, same noise, any process."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{completion}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).gauss(0.0, std)


@SCORER_KINDS.register("toy_noisy_gold")
class ToyNoisyGoldScorer(Scorer):
    def __init__(self, name: str, noise_std: float, seed: int):
        super().__init__(name)
        self.noise_std, self.seed = noise_std, seed

    @classmethod
    def from_config(cls, cfg, name, field):
        return cls(name, cfg.noise_std, cfg.seed)

    def compute(self, prompts, completions, columns):
        gold = gold_reward(prompts, completions)
        return [g + sample_noise(self.seed, p, c, self.noise_std) for g, p, c in zip(gold, prompts, completions)]


def names_a_file(where: str) -> bool:
    """Whether the part of a python scorer's ``where:fn`` before the colon is a file path
    (else a module name)."""
    return where.endswith(".py") or "/" in where or "\\" in where


def required_path(cfg: ScorerConfig, field: str) -> str:
    if not cfg.path:
        raise UserError(f"{field}.path: kind '{cfg.kind}' needs a path")
    return cfg.path


def load_python_function(spec: str, field: str) -> Callable[..., Any]:
    """The function named by ``path/to/file.py:fn`` or ``package.module:fn``; UserError otherwise."""
    where, sep, fn_name = spec.rpartition(":")
    if not sep or not where or not fn_name:
        raise UserError(f"{field}: expected 'path/to/file.py:function' or 'package.module:function', got '{spec}'")
    if names_a_file(where):
        file = Path(where).expanduser().resolve()
        if not file.is_file():
            raise UserError(f"{field}: no python file '{where}' (from '{spec}')")
        module_name = f"flywheel_reward_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:10]}"
        module = sys.modules.get(module_name)
        if module is None:
            import_spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(import_spec)
            try:
                import_spec.loader.exec_module(module)
            except Exception as exc:
                raise UserError(f"{field}: importing '{where}' failed: {type(exc).__name__}: {exc}") from exc
            sys.modules[module_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
                raise UserError(f"{field}: no python module '{where}' (from '{spec}')") from None
            raise
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise UserError(f"{field}: '{where}' has no function '{fn_name}'")
    if not callable(fn):
        raise UserError(f"{field}: '{where}:{fn_name}' is a {type(fn).__name__}, not a function")
    return fn


@SCORER_KINDS.register("python")
class PythonScorer(Scorer):
    """``fn(prompts, completions, **columns)``: a list of scores; with ``step_delimiter`` (a
    process reward) a list of per-step score lists, one score per ``split_steps`` piece, and
    the completion's score is their ``step_reduce``."""

    def __init__(self, name: str, fn: Callable[..., Any], step_delimiter: str | None = None, step_reduce: str = "min"):
        super().__init__(name)
        self.fn, self.step_delimiter, self.step_reduce = fn, step_delimiter, step_reduce

    @classmethod
    def resolve(cls, cfg, field):
        """The function must import; a file path becomes absolute."""
        spec = required_path(cfg, field)
        load_python_function(spec, f"{field}.path")
        where, _, fn_name = spec.rpartition(":")
        if names_a_file(where):
            return cfg.model_copy(update={"path": f"{Path(where).expanduser().resolve()}:{fn_name}"})
        return cfg

    @classmethod
    def from_config(cls, cfg, name, field):
        return cls(name, load_python_function(cfg.path, f"{field}.path"), cfg.step_delimiter, cfg.step_reduce)

    def compute(self, prompts, completions, columns):
        if self.step_delimiter is None:
            return self.fn(prompts, completions, **columns)
        return self.score_steps(prompts, completions, columns)[0]

    def score_steps(self, prompts, completions, columns=None):
        if self.step_delimiter is None:
            return super().score_steps(prompts, completions, columns)
        prompts, completions, columns = self.checked_inputs(prompts, completions, columns)
        if not prompts:
            return [], []
        out = self.fn(prompts, completions, **columns)
        if hasattr(out, "tolist"):
            out = out.tolist()
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or len(out) != len(completions):
            raise ScorerOutputError(f"reward scorer '{self.name}': expected {len(completions)} lists of step scores "
                                    f"(step_delimiter {self.step_delimiter!r}), got {type(out).__name__}")
        steps = []
        for i, (row, completion) in enumerate(zip(out, completions)):
            want = len(split_steps(completion, self.step_delimiter))
            if hasattr(row, "tolist"):
                row = row.tolist()
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise ScorerOutputError(f"reward scorer '{self.name}': completion {i}: expected a list of {want} step "
                                        f"scores, got {type(row).__name__}")
            try:
                steps.append(validate_scores(self.name, row, want))
            except ScorerOutputError as exc:
                raise ScorerOutputError(f"{exc} (the step scores of completion {i}: {want} steps at "
                                        f"{self.step_delimiter!r})") from None
        return [reduce_steps(row, self.step_reduce) for row in steps], steps


def scorer_error(scorer: Scorer, field: str, exc: BaseException) -> ScorerError:
    """A ScorerError naming the scorer, its config field and, for a python scorer, the line
    of the user's file where it raised."""
    import traceback

    source, at = "", ""
    code = getattr(getattr(scorer, "fn", None), "__code__", None)
    if code is not None:
        source = f", python {code.co_filename}:{code.co_name}"
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == code.co_filename]
        if frames:
            at = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})"
    return ScorerError(f"reward scorer '{scorer.name}' ({field}{source}) raised {type(exc).__name__}: {exc}{at}")


def reward_model_text(tokenizer, prompt: str, completion: str) -> str:
    """The text a reward model scores: a user/assistant chat if the tokenizer has a template,
    else prompt + completion. Reward-model training must encode pairs the same way."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
    return prompt + completion


def encode_reward_inputs(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int):
    """Padded tensors (``input_ids``, ``attention_mask``) of the texts a reward model scores,
    truncated on the left so the last token, where the score is read, survives. Training
    (``flywheel train-rm``) and scoring both encode through here."""
    texts = [reward_model_text(tokenizer, p, c) for p, c in zip(prompts, completions)]
    special = not getattr(tokenizer, "chat_template", None)  # a template adds its own
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, add_special_tokens=special,
            return_tensors="pt",
        )
    finally:
        tokenizer.truncation_side = side


@SCORER_KINDS.register("hf")
class HFScorer(Scorer):
    """``AutoModelForSequenceClassification`` (num_labels=1) from a local directory, fp32 on CPU."""

    def __init__(self, name: str, path: str, field: str, batch_size: int = 32, max_length: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        super().__init__(name)
        self.batch_size, self.max_length = batch_size, max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{field}: could not load a sequence-classification model from '{path}': {exc}") from None
        if self.model.config.num_labels != 1:
            raise UserError(
                f"{field}: '{path}' has num_labels={self.model.config.num_labels}; a reward model needs num_labels=1"
            )
        require_padding(self.tokenizer, path, f"{field}.path")
        if self.model.config.pad_token_id is None:  # needed to find each row's last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to("cpu").eval()

    @classmethod
    def resolve(cls, cfg, field):
        """The model directory must exist (it is loaded only in ``from_config``); made absolute."""
        path = Path(required_path(cfg, field)).expanduser()
        if not path.is_dir():
            raise UserError(f"{field}.path: no model directory at '{cfg.path}'")
        check_model_files(path, f"{field}.path")
        return cfg.model_copy(update={"path": str(path.resolve())})

    @classmethod
    def from_config(cls, cfg, name, field):
        return cls(name, cfg.path, f"{field}.path", cfg.batch_size, cfg.max_length)

    def compute(self, prompts, completions, columns):
        import torch

        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                end = start + self.batch_size
                enc = encode_reward_inputs(self.tokenizer, prompts[start:end], completions[start:end], self.max_length)
                logits = self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
                out.extend(logits[:, 0].float().tolist())
        return out


def bearer_token(token_env: str | None, address: str, field: str) -> str | None:
    """A remote scorer's token, ``os.environ[token_env]`` (None when ``token_env`` is None);
    UserError when that variable is unset or empty."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise UserError(
            f"{field}.token_env: the environment variable {token_env} (bearer token for the reward "
            f"server at {address}) is not set or empty"
        )
    return token


@SCORER_KINDS.register("remote")
class RemoteScorer(Scorer):
    """A reward server's aggregate score, or one of its members' (``member``), over gRPC.

    The channel is opened here but nothing is sent until the first ``score``, so building one
    does not need the server up. The bearer token is read from ``os.environ[token_env]``.
    """

    def __init__(
        self, name: str, address: str, timeout_s: float, field: str, retries: int = 4, token_env: str | None = None,
        member: str | None = None, max_message_mb: float = 16.0, tls_ca: str | None = None,
        tls_cert: str | None = None, tls_key: str | None = None,
    ):
        from services.reward.grpc_client import RewardClient
        from services.rpc.tls import channel_credentials

        super().__init__(name)
        self.address, self.member, self.field = address, member, field
        token = bearer_token(token_env, address, field)
        tls = channel_credentials(tls_ca, tls_cert, tls_key, field) if tls_ca else None
        self.client = RewardClient(
            address, timeout_s, retries, token=token, max_message_mb=max_message_mb, token_env=token_env, tls=tls
        )

    @classmethod
    def resolve(cls, cfg, field):
        """The token variable must be set and the TLS files readable; the server is not contacted."""
        from services.rpc.tls import read_pem

        bearer_token(cfg.token_env, cfg.address, field)
        for key in ("tls_ca", "tls_cert", "tls_key"):
            if getattr(cfg, key):
                read_pem(getattr(cfg, key), f"{field}.{key}")
        return cfg

    @classmethod
    def from_config(cls, cfg, name, field):
        return cls(
            name, cfg.address, cfg.timeout_s, field, retries=cfg.retries, token_env=cfg.token_env,
            member=cfg.member, max_message_mb=cfg.max_message_mb, tls_ca=cfg.tls_ca, tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key,
        )

    @classmethod
    def actor_env(cls, cfg):
        """The bearer token's variable, when set here."""
        return {cfg.token_env: os.environ[cfg.token_env]} if cfg.token_env and os.environ.get(cfg.token_env) else {}

    def compute(self, prompts, completions, columns):
        from services.reward.grpc_client import NotGrpcServerError

        try:
            result = self.client.score(prompts, completions, columns)
        except NotGrpcServerError as exc:
            raise ScorerError(f"reward scorer '{self.name}' ({self.field}): {exc.address} {exc.answer}; is "
                              f"{self.field}.address the port of `flywheel serve-reward`?{exc.hint}") from None
        if self.member is None:
            return result.scores
        if self.member not in result.member_names:
            raise UserError(
                f"{self.field}.member: the reward server at {self.address} has no member '{self.member}'; "
                f"its members: {', '.join(result.member_names)}"
            )
        return result.member_scores[result.member_names.index(self.member)]


def scorer_class(cfg: ScorerConfig, index: int) -> type[Scorer]:
    """The registered class of ``reward.scorers[index]``'s kind; a UserError naming the field
    and the registered kinds otherwise."""
    return SCORER_KINDS.get(cfg.kind, f"reward.scorers.{index}.kind")


def resolve_scorer_config(cfg: ScorerConfig, index: int) -> ScorerConfig:
    """Check a scorer config cheaply (paths exist, the function imports; a remote server is
    not contacted) and return a copy with absolute paths, ready to ship to an actor in
    another process."""
    return scorer_class(cfg, index).resolve(cfg, f"reward.scorers.{index}")


def scorer_env(cfg: ScorerConfig, index: int) -> dict[str, str]:
    """Environment variables a scorer's actor needs from this process (a remote scorer's token)."""
    return scorer_class(cfg, index).actor_env(cfg)


def build_scorer(cfg: ScorerConfig, index: int) -> Scorer:
    """The scorer for ``reward.scorers[index]``; UserError (naming the field) on bad input."""
    cfg = resolve_scorer_config(cfg, index)
    return scorer_class(cfg, index).from_config(cfg, scorer_name(cfg, index), f"reward.scorers.{index}")


__all__ = [
    "SCORER_KINDS", "Scorer", "ScorerOutputError", "ScorerError", "scorer_error", "ToyGoldScorer",
    "ToyNoisyGoldScorer", "PythonScorer", "HFScorer", "RemoteScorer", "build_scorer", "scorer_class",
    "resolve_scorer_config", "scorer_env", "load_python_function", "names_a_file", "required_path",
    "bearer_token", "validate_scores", "scorer_name", "sample_noise", "reward_model_text", "encode_reward_inputs",
]
