"""Reward scorers and the plain (Ray-free) ensemble: every kind, output validation, bad
input as UserError naming the field, and aggregation checked by hand."""

from __future__ import annotations

import math
import statistics
import typing

import pytest
from pydantic import ValidationError

from services.core import toy_world as tw
from services.core.config import SCORER_FIELDS, RewardConfig, ScorerConfig
from services.core.errors import UserError
from services.reward.ensemble import RewardEnsemble
from services.reward.judge import JudgeScorer
from services.reward.scorers import (
    SCORER_KINDS, HFScorer, PythonScorer, RemoteScorer, ScorerOutputError, ToyGoldScorer, ToyNoisyGoldScorer,
    build_scorer, resolve_scorer_config, reward_model_text, sample_noise, scorer_env, validate_scores,
)

PROMPTS = ["list 3 fruits:", "list 2 colors:", "12+7=", "list 4 tools:", "3-1="]
COMPLETIONS = [" apple mango plum", " red", "19", " hammer saw drill wrench ladder", "5"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
REWARD_FNS = '''
import math

def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def with_column(prompts, completions, answer):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def nan_at_1(prompts, completions, **columns):
    return [0.0, math.nan] + [0.0] * (len(prompts) - 2)

def inf_at_2(prompts, completions, **columns):
    return [0.0, 0.0, -math.inf] + [0.0] * (len(prompts) - 3)

def too_short(prompts, completions, **columns):
    return [0.0] * (len(prompts) - 1)

def words(prompts, completions, **columns):
    return ["1.0", "one"]

def const_a(prompts, completions, **columns):
    return [1.0, 2.0]

def const_b(prompts, completions, **columns):
    return [3.0, 4.0]

def const_c(prompts, completions, **columns):
    return [5.0, 9.0]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def fns_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FNS)
    return path


def python_cfg(fns_file, fn: str, name: str | None = None) -> ScorerConfig:
    return ScorerConfig(kind="python", path=f"{fns_file}:{fn}", name=name)


# --- scorer kinds registry ---------------------------------------------------------------------


def test_registered_kinds_are_the_configs_kinds():
    """A kind added to SCORER_KINDS, SCORER_FIELDS or ScorerConfig.kind alone fails here."""
    literal = set(typing.get_args(ScorerConfig.model_fields["kind"].annotation))
    assert set(SCORER_KINDS.names()) == set(SCORER_FIELDS) == literal
    assert literal == {
        "hf", "python", "remote", "toy_gold", "toy_noisy_gold", "math_verify", "exact_match", "regex", "judge"
    }
    assert all({"kind", "name"} <= fields for fields in SCORER_FIELDS.values())


def minimal_config(kind: str, tmp_path) -> ScorerConfig:
    """The smallest valid config of each registered kind (files it needs written to tmp_path)."""
    if kind == "python":
        (tmp_path / "lengths.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
        return ScorerConfig(kind="python", path=f"{tmp_path / 'lengths.py'}:length")
    if kind == "hf":
        save_tiny_reward_model(tmp_path / "rm")
        return ScorerConfig(kind="hf", path=str(tmp_path / "rm"))
    if kind == "remote":
        return ScorerConfig(kind="remote", address="localhost:50051")
    if kind == "regex":
        return ScorerConfig(kind="regex", pattern=r"(-?\d+)")
    if kind == "judge":  # an endpoint: building does not contact it (a vLLM judge: tests/integration)
        return ScorerConfig(kind="judge", address="http://127.0.0.1:8000/v1", judge_model="judge")
    return ScorerConfig(kind=kind)


@pytest.mark.parametrize("kind", SCORER_KINDS.names())
def test_every_registered_kind_builds_from_a_minimal_config(kind, tmp_path):
    scorer = build_scorer(minimal_config(kind, tmp_path), 3)
    assert isinstance(scorer, SCORER_KINDS.get(kind)) and scorer.name == f"{kind}-3"
    gold = tw.gold_reward(PROMPTS, COMPLETIONS)
    if kind == "toy_gold":
        assert type(scorer) is ToyGoldScorer and scorer.score(PROMPTS, COMPLETIONS) == gold
    elif kind == "toy_noisy_gold":  # the defaults: noise_std 0.1, seed 0
        assert type(scorer) is ToyNoisyGoldScorer and (scorer.noise_std, scorer.seed) == (0.1, 0)
        noisy = scorer.score(PROMPTS, COMPLETIONS)
        assert noisy == [g + sample_noise(0, p, c, 0.1) for g, p, c in zip(gold, PROMPTS, COMPLETIONS)]
        assert noisy != gold and all(abs(n - g) < 0.5 for n, g in zip(noisy, gold))  # 5 std
    elif kind == "python":
        assert type(scorer) is PythonScorer and scorer.score(PROMPTS, COMPLETIONS) == [17.0, 4.0, 2.0, 31.0, 1.0]
    elif kind == "hf":
        assert type(scorer) is HFScorer and all(math.isfinite(x) for x in scorer.score(PROMPTS, COMPLETIONS))
    elif kind == "remote":  # building does not contact the server (nothing listens there)
        assert type(scorer) is RemoteScorer and scorer.client.address == "localhost:50051"
    elif kind == "judge":  # nor does a judge at an endpoint (tests/unit/test_judge_scorer.py scores with one)
        assert type(scorer) is JudgeScorer and scorer.backend.url == "http://127.0.0.1:8000/v1/completions"
        assert type(scorer).columns_needed(minimal_config(kind, tmp_path)) == []
    elif kind in ("math_verify", "exact_match", "regex"):  # against the default answer_key column 'answer'
        answers = {"answer": ["3", "1", "19", "4", "2"]}
        assert scorer.score(PROMPTS, COMPLETIONS, answers) == [0.0, 0.0, 1.0, 0.0, 0.0]
        assert type(scorer).columns_needed(minimal_config(kind, tmp_path)) == ["answer"]
    else:
        pytest.fail(f"scorer kind '{kind}' has no case here: add its minimal config and expected scores")


def test_unknown_kind_names_the_field_and_the_registered_kinds(tmp_path):
    cfg = ScorerConfig.model_construct(**{**ScorerConfig().model_dump(), "kind": "llm_judge"})  # past the Literal
    registered = "exact_match, hf, judge, math_verify, python, regex, remote, toy_gold, toy_noisy_gold"
    for call in (build_scorer, resolve_scorer_config, scorer_env):
        with pytest.raises(UserError) as err:
            call(cfg, 2)
        assert str(err.value) == f"reward.scorers.2.kind: unknown reward scorer kind 'llm_judge'; registered: {registered}"
    with pytest.raises(UserError, match=r"^reward\.scorers\[\]\.kind: unknown reward scorer kind 'nope'"):
        SCORER_KINDS.get("nope")
    with pytest.raises(ValidationError, match="kind"):  # the config refuses it before any lookup
        ScorerConfig(kind="llm_judge")


def test_scorer_env_only_for_a_remote_token(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TEST_RM_TOKEN", "s3cret")
    remote = ScorerConfig(kind="remote", address="localhost:50051", token_env="FLYWHEEL_TEST_RM_TOKEN")
    assert scorer_env(remote, 0) == {"FLYWHEEL_TEST_RM_TOKEN": "s3cret"}
    assert scorer_env(remote.model_copy(update={"token_env": None}), 0) == {}
    assert scorer_env(ScorerConfig(), 0) == {} and scorer_env(ScorerConfig(kind="toy_noisy_gold"), 1) == {}


# --- python scorer -----------------------------------------------------------------------------


def test_python_scorer_from_file(fns_file):
    scorer = build_scorer(python_cfg(fns_file, "length"), 0)
    assert isinstance(scorer, PythonScorer) and scorer.name == "python-0"
    assert scorer.score(PROMPTS, COMPLETIONS) == [float(len(c)) for c in COMPLETIONS]
    column = build_scorer(python_cfg(fns_file, "with_column", name="exact"), 1)
    assert column.name == "exact"
    assert column.score(["1+1=", "2+2="], ["2", " 5"], {"answer": ["2", "4"]}) == [1.0, 0.0]


def test_python_scorer_relative_path(fns_file, monkeypatch):
    monkeypatch.chdir(fns_file.parent)
    assert build_scorer(ScorerConfig(kind="python", path="my_rewards.py:length"), 0).score(["a"], ["xyz"]) == [3.0]


def test_python_scorer_package_module_form(tmp_path, monkeypatch):
    pkg = tmp_path / "flywheel_test_pkg_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "verifiers.py").write_text("def double_len(prompts, completions):\n    return [2.0 * len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = build_scorer(ScorerConfig(kind="python", path="flywheel_test_pkg_rewards.verifiers:double_len"), 0)
    assert scorer.score(["p", "q"], ["ab", "abcd"]) == [4.0, 8.0]
    gold = build_scorer(ScorerConfig(kind="python", path="services.core.toy_world:gold_reward"), 1)
    assert gold.score(PROMPTS, COMPLETIONS) == tw.gold_reward(PROMPTS, COMPLETIONS)


# --- toy kinds ---------------------------------------------------------------------------------


def test_toy_gold_matches_toy_world():
    scorer = build_scorer(ScorerConfig(), 0)
    assert scorer.name == "toy_gold-0"
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert scores == tw.gold_reward(PROMPTS, COMPLETIONS)
    # by hand: 3 fruits of 3; 1 color of 2; right sum; 4 tools + 1 extra of 4; wrong difference
    assert scores == pytest.approx([1.0, 0.5, 1.0, (4 - 0.5) / 4, 0.0])


def test_toy_noisy_gold_deterministic_and_noise_std():
    rows = [r.prompt for r in tw.ListTask().prompts(4000, seed=3)]
    comps = [" " + " ".join(tw.ALL_WORDS[i % 7 : i % 7 + 1 + i % 4]) for i in range(len(rows))]
    cfg = ScorerConfig(kind="toy_noisy_gold", noise_std=0.3, seed=11)
    scorer = build_scorer(cfg, 2)
    assert scorer.name == "toy_noisy_gold-2"
    first = scorer.score(rows, comps)
    assert scorer.score(rows, comps) == first  # same call, same scores
    assert build_scorer(cfg, 0).score(rows[::-1], comps[::-1]) == first[::-1]  # per sample, not per position
    noise = [s - g for s, g in zip(first, tw.gold_reward(rows, comps))]
    assert statistics.stdev(noise) == pytest.approx(0.3, rel=0.05)
    assert abs(statistics.fmean(noise)) < 0.03  # 3 standard errors: 3 * 0.3 / sqrt(4000)
    other = build_scorer(cfg.model_copy(update={"seed": 12}), 0).score(rows, comps)
    other_noise = [s - g for s, g in zip(other, tw.gold_reward(rows, comps))]
    assert abs(statistics.correlation(noise, other_noise)) < 0.1  # seeds give independent noise
    exact = build_scorer(cfg.model_copy(update={"noise_std": 0.0}), 0).score(rows[:50], comps[:50])
    assert exact == tw.gold_reward(rows[:50], comps[:50])


# --- hf scorer ---------------------------------------------------------------------------------


def save_tiny_reward_model(directory, chat_template: str | None = None, num_labels: int = 1):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from services.core.tiny_model import train_toy_tokenizer

    texts = [r["prompt"] + r["response"] for r in tw.sft_corpus(["preference", "arithmetic"], 100, seed=0)]
    tokenizer = train_toy_tokenizer(texts, vocab_size=320)
    if chat_template:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
        num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["concat", "chat_template"])
def test_hf_scorer_matches_direct_forward(tmp_path, template):
    import torch

    model, tokenizer = save_tiny_reward_model(tmp_path / "rm", template)
    scorer = build_scorer(ScorerConfig(kind="hf", path=str(tmp_path / "rm"), batch_size=2), 0)
    assert isinstance(scorer, HFScorer) and scorer.name == "hf-0"
    assert not scorer.model.training
    scores = scorer.score(PROMPTS, COMPLETIONS)  # batches of 2 with padding, and a batch of 1
    assert len(scores) == len(PROMPTS) and all(math.isfinite(s) for s in scores)
    if template:
        assert reward_model_text(tokenizer, "1+1=", "2") == "<|user|>1+1=<|eos|><|assistant|>2<|eos|>"
    else:
        assert reward_model_text(tokenizer, "1+1=", "2") == "1+1=2"
    expected = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS):  # one sequence at a time: no padding at all
            ids = tokenizer(reward_model_text(tokenizer, p, c), add_special_tokens=False, return_tensors="pt").input_ids
            assert tokenizer.pad_token_id not in ids
            expected.append(model(input_ids=ids).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) > 1  # not one constant for every sample


def test_hf_scorer_rejects_multi_label_model(tmp_path):
    save_tiny_reward_model(tmp_path / "clf", num_labels=2)
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: .*num_labels=2"):
        build_scorer(ScorerConfig(kind="hf", path=str(tmp_path / "clf")), 0)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, name, pattern",
    [
        ("nan_at_1", "nan-rm", r"reward scorer 'nan-rm': score at index 1 is not finite: nan"),
        ("inf_at_2", None, r"reward scorer 'python-4': score at index 2 is not finite: -inf"),
        ("too_short", "short", r"reward scorer 'short': wrong number of scores: expected 5, got 4"),
        ("words", "w", r"reward scorer 'w': wrong number of scores: expected 5, got 2"),
    ],
)
def test_bad_output_names_scorer_and_index(fns_file, fn, name, pattern):
    scorer = build_scorer(python_cfg(fns_file, fn, name), 4)
    with pytest.raises(ScorerOutputError, match=pattern):
        scorer.score(PROMPTS, COMPLETIONS)
    assert issubclass(ScorerOutputError, ValueError)


def test_validate_scores_direct():
    import numpy as np
    import torch

    assert validate_scores("s", np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    assert validate_scores("s", torch.tensor([0.5]), 1) == [0.5]
    with pytest.raises(ScorerOutputError, match=r"'s': score at index 1 is a str, not a number: 'one'"):
        validate_scores("s", [1.0, "one"], 2)
    with pytest.raises(ScorerOutputError, match=r"'s': score at index 0 is a str, not a number: '1.0'"):
        validate_scores("s", ["1.0"], 1)  # not coerced (issue #22)
    with pytest.raises(ScorerOutputError, match=r"'s': score at index 0 is not a number: None"):
        validate_scores("s", [None], 1)
    assert validate_scores("s", [True, False], 2) == [1.0, 0.0]  # a pass / fail check
    with pytest.raises(ScorerOutputError, match=r"'s': expected a list of 2 floats, got float"):
        validate_scores("s", 1.0, 2)
    with pytest.raises(ScorerOutputError, match=r"index 0 is not finite: inf"):
        validate_scores("s", [float("inf")], 1)


def test_mismatched_inputs_rejected(fns_file):
    scorer = build_scorer(python_cfg(fns_file, "length"), 0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorer.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 samples"):
        scorer.score(["a", "b"], ["c", "d"], {"answer": ["x"]})
    assert scorer.score([], []) == []


# --- bad input ---------------------------------------------------------------------------------


def test_python_path_errors(fns_file, tmp_path):
    with pytest.raises(UserError, match=r"reward\.scorers\.3\.path: no python file '.*missing\.py'"):
        build_scorer(ScorerConfig(kind="python", path=f"{tmp_path}/missing.py:fn"), 3)
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: '.*my_rewards\.py' has no function 'nope'"):
        build_scorer(python_cfg(fns_file, "nope"), 0)
    with pytest.raises(UserError, match=r"reward\.scorers\.1\.path: .*NOT_A_FUNCTION' is a int, not a function"):
        build_scorer(python_cfg(fns_file, "NOT_A_FUNCTION"), 1)
    with pytest.raises(UserError, match=r"reward\.scorers\.2\.path: no python module 'flywheel_no_such_pkg\.mod'"):
        build_scorer(ScorerConfig(kind="python", path="flywheel_no_such_pkg.mod:fn"), 2)
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: expected 'path/to/file\.py:function'"):
        build_scorer(ScorerConfig(kind="python", path="my_rewards.py"), 0)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: importing '.*broken\.py' failed: SyntaxError"):
        build_scorer(ScorerConfig(kind="python", path=f"{broken}:f"), 0)


def test_hf_path_not_a_directory(tmp_path):
    with pytest.raises(UserError, match=r"reward\.scorers\.1\.path: no model directory at '.*nowhere'"):
        build_scorer(ScorerConfig(kind="hf", path=str(tmp_path / "nowhere")), 1)
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: no model directory"):
        build_scorer(ScorerConfig(kind="hf", path=str(tmp_path / "file.bin")), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"reward\.scorers\.0\.path: could not load a sequence-classification model"):
        build_scorer(ScorerConfig(kind="hf", path=str(tmp_path / "empty")), 0)


def test_remote_kind_builds_a_client_without_contacting_the_server(monkeypatch):
    cfg = ScorerConfig(kind="remote", address="localhost:50051", timeout_s=5, retries=2, name="rm-remote")
    assert resolve_scorer_config(cfg, 0) == cfg  # nothing to resolve, nothing refused
    scorer = build_scorer(cfg, 0)  # no server listens there: building must not need one
    assert isinstance(scorer, RemoteScorer) and scorer.name == "rm-remote" and scorer.member is None
    client = scorer.client
    assert (client.address, client.timeout_s, client.retries, client.token) == ("localhost:50051", 5.0, 2, None)
    assert client.max_message_bytes == 16 * 2**20
    with_token = cfg.model_copy(update={"token_env": "FLYWHEEL_TEST_RM_TOKEN", "member": "rm-a"})
    monkeypatch.delenv("FLYWHEEL_TEST_RM_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"reward\.scorers\.3\.token_env: the environment variable FLYWHEEL_TEST_RM_TOKEN "):
        build_scorer(with_token, 3)
    monkeypatch.setenv("FLYWHEEL_TEST_RM_TOKEN", "")
    with pytest.raises(UserError, match="is not set or empty"):
        build_scorer(with_token, 3)
    monkeypatch.setenv("FLYWHEEL_TEST_RM_TOKEN", "s3cret")
    scorer = build_scorer(with_token, 3)
    assert scorer.client.token == "s3cret" and scorer.client.token_env == "FLYWHEEL_TEST_RM_TOKEN"
    assert scorer.member == "rm-a"


def test_config_validation():
    assert RewardConfig().scorers[0].kind == "toy_gold"  # defaults stay valid
    with pytest.raises(ValidationError, match="kind 'python' needs path"):
        ScorerConfig(kind="python")
    with pytest.raises(ValidationError, match="kind 'hf' needs path"):
        ScorerConfig(kind="hf")
    for address in (None, "localhost", "host:port", "host:70000"):
        with pytest.raises(ValidationError, match="needs address as host:port"):
            ScorerConfig(kind="remote", address=address)
    with pytest.raises(ValidationError, match="scorer names must be unique, repeated: toy_gold-0"):
        RewardConfig(scorers=[ScorerConfig(), ScorerConfig(kind="toy_noisy_gold", name="toy_gold-0")])
    with pytest.raises(ValidationError):
        RewardConfig(scorers=[])
    with pytest.raises(ValidationError):
        ScorerConfig(kind="toy_noisy_gold", noise_std=-1)


# --- plain ensemble ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, lam, expected",
    [
        # members per sample: (1, 3, 5) and (2, 4, 9); std: 2 and sqrt(13) (K-1 = 2)
        ("mean", 1.0, [3.0, 5.0]),
        ("wco", 1.0, [1.0, 2.0]),
        ("uwo", 0.5, [3.0 - 0.5 * 2.0, 5.0 - 0.5 * math.sqrt(13)]),
        ("uwo", 0.0, [3.0, 5.0]),
    ],
)
def test_plain_ensemble_aggregation_by_hand(fns_file, mode, lam, expected):
    cfg = RewardConfig(
        scorers=[python_cfg(fns_file, f"const_{m}", name=f"m{m}") for m in "abc"], aggregate=mode, uwo_lambda=lam
    )
    result = RewardEnsemble(cfg).score(["p", "q"], ["x", "y"])
    assert result.member_names == ["ma", "mb", "mc"]
    assert result.member_scores == [[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]
    assert result.member_std == pytest.approx([2.0, math.sqrt(13)])
    assert result.scores == pytest.approx(expected)
    summary = result.summary()
    assert summary["reward/mean"] == pytest.approx(sum(expected) / 2)
    assert summary["reward/member/mc"] == pytest.approx(7.0)


def test_plain_ensemble_single_member_and_bad_member(fns_file):
    single = RewardEnsemble(RewardConfig()).score(PROMPTS, COMPLETIONS)
    assert single.scores == tw.gold_reward(PROMPTS, COMPLETIONS) and single.member_std == [0.0] * 5
    bad = RewardConfig(scorers=[ScorerConfig(), python_cfg(fns_file, "nan_at_1", name="broken")])
    with pytest.raises(ScorerOutputError, match="'broken': score at index 1"):
        RewardEnsemble(bad).score(PROMPTS, COMPLETIONS)
