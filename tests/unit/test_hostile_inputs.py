"""Bad input, tried on purpose (issue #8): every case goes through the real `flywheel` command
where one exists and must give exit status 2, a message naming the field, file or line, no
Python traceback, and leave good state alone: an OUT holding a finished run (metrics.jsonl,
config.yaml, checkpoints, policy) and the input files stay byte-identical.

Everything here fails before Ray, vLLM or DeepSpeed start (a few seconds per command). The
cases that need Ray actors (a reward function failing inside the reward service, and one
`flywheel train` whose reward function raises) are in tests/e2e/test_hostile_inputs_ray.py;
the output directory's cases in test_hostile_out.py; damaged files in test_hostile_files.py.

Prompt length, decided: RL refuses a prompt longer than ``data.max_prompt_tokens`` (exit 2,
before Ray): truncating it would make the policy answer a prompt the reward function never
sees. SFT keeps truncating, as is usual (the prompt keeps its last tokens, next to the
response; the response its first), but now says so on stderr with the counts.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from services.core.errors import UserError
from services.driver import preflight
from services.driver.checkpoint import CheckpointStore, model_fingerprint
from tests.hostile import (  # noqa: F401 (good_run, good_sft: fixtures)
    STALE_MODEL, assert_user_error, flywheel, good_run, good_sft, load, make_checkpoint, snapshot, train_fails,
)

# --- 1. malformed YAML --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"rollout:\n  n_samples: 4\n   temperature: 1.0\nlearner:\n  lr: 0.1\n",
         "bad.yaml:3: invalid YAML: mapping values are not allowed here"),
        (b'algorithm:\n  name: "grpo\nrollout:\n  n_samples: 4\n',
         "invalid YAML: found unexpected end of stream (while scanning a quoted scalar at line 2)"),
        (b"algorithm:\n\tname: grpo\n", "bad.yaml:2: invalid YAML: found character '\\t' that cannot start any token"),
        (b"rollout:\n  n_samples: 4\n  n_samples: 8\n",
         "bad.yaml:3: invalid YAML: duplicate key 'n_samples' (first at line 2)"),
        (b"seed: 0\nrollout:\n  n_samples: 4 # \xff\xfe\n", "bad.yaml:3: not valid UTF-8 (byte 0xff)"),
        (b"- algorithm\n- rollout\n", "the top level must be a mapping of sections, got list"),
    ],
    ids=["indent", "unclosed-quote", "tab", "duplicate-key", "not-utf8", "not-a-mapping"],
)
def test_malformed_yaml_names_the_file_and_line(good_run, tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_bytes(text)
    train_fails(good_run, str(config), expected=[expected])
    assert_user_error(flywheel("validate", str(config)), expected)
    assert config.read_bytes() == text


# --- 2. wrong types and unknown keys ------------------------------------------------------------


def test_wrong_types_and_unknown_keys_name_every_field_path(good_run, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "algorithm:\n  name: grpo\n"
        "rollout:\n  n_samples: four\n  temprature: 0.7\n"
        "learner:\n  micro_batch_size: [32]\n"
        "reward:\n  scorers:\n    - {kind: python, path: r.py:fn, wieght: 2}\n"
        "metrics:\n  prometheus_port: http\n"
    )
    train_fails(good_run, str(config), "learner.lr=fast", expected=[
        "6 error(s) in config",
        "override 'learner.lr=fast': learner.lr: Input should be a valid number",  # named by the override
        "bad.yaml:4: rollout.n_samples: Input should be a valid integer, unable to parse string as an integer "
        "(got 'four')",
        "bad.yaml:5: rollout.temprature: unknown key",
        "bad.yaml:7: learner.micro_batch_size: Input should be a valid integer",
        "bad.yaml:10: reward.scorers.0.wieght: unknown key",
        "bad.yaml:12: metrics.prometheus_port: Input should be a valid integer",
    ])
    assert_user_error(flywheel("validate", "grpo-toy", "learner.lr=fast", "algorithm.nmae=grpo"),
                      "override 'learner.lr=fast': learner.lr: Input should be a valid number",
                      "override 'algorithm.nmae=grpo': algorithm.nmae: unknown key")


# --- 3. zero or negative batch sizes ------------------------------------------------------------


@pytest.mark.parametrize("override", [
    "rollout.prompts_per_step=0", "learner.micro_batch_size=-1", "reference.micro_batch_size=0",
    "learner.grad_accum_steps=0", "rollout.num_workers=0",
])
def test_zero_or_negative_batch_sizes_are_refused(good_run, override):
    field, value = override.split("=")
    train_fails(good_run, "grpo-toy", override, expected=[
        f"override '{override}': {field}: Input should be greater than or equal to 1 (got {value})"
    ])


@pytest.mark.parametrize("override, expected", [
    ("learner.lr=inf", "learner.lr: Input should be a finite number (got 'inf')"),
    ("algorithm.kl_coef=-inf", "algorithm.kl_coef: Input should be a finite number (got '-inf')"),
    ("learner.lr=nan", "learner.lr: Input should be a finite number (got 'nan')"),
    ("rollout.temperature=0", "rollout: Value error, temperature 0 is greedy decoding, which gives one response per "
     "prompt; set n_samples: 1 or a temperature above 0 (got n_samples 4)"),
    ("eval.temperature=0", "eval: Value error, temperature 0 is greedy decoding"),
    ("rollout.n_samples=20000", "rollout.n_samples: Input should be less than or equal to 16384 (got 20000)"),
], ids=["inf-lr", "minus-inf-kl", "nan-lr", "greedy-with-n-4", "greedy-eval-with-n-4", "n-over-vllm-limit"])
def test_settings_vllm_or_the_optimizer_would_fail_on_later_are_refused(good_run, override, expected):
    """Issue #22: these passed validation and crashed inside vLLM ~35 s in, or trained on inf."""
    train_fails(good_run, "grpo-toy", override, expected=[f"override '{override}': {expected}"])


def test_greedy_with_one_sample_is_fine():
    cfg = load("grpo-toy", "rollout.temperature=0", "rollout.n_samples=1", "algorithm.name=reinforce_pp")
    assert (cfg.rollout.temperature, cfg.rollout.n_samples) == (0.0, 1)


def test_config_path_that_is_a_directory(good_run, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    train_fails(good_run, str(folder), expected=[f"config path is a directory, not a YAML file: {folder}"])


# --- 4. one sample per prompt for group algorithms ------------------------------------------------


@pytest.mark.parametrize("preset, algorithm", [("grpo-toy", "grpo"), ("dpo-toy", "online_dpo")])
def test_one_sample_per_prompt_for_grpo_and_online_dpo(good_run, preset, algorithm):
    """Refused before the toy policy's SFT (model.path is null in the presets) writes OUT/sft."""
    train_fails(good_run, preset, "rollout.n_samples=1", expected=[
        f"rollout.n_samples: {algorithm} needs at least 2 samples per prompt, got 1"
    ])
    assert not (good_run / "sft").exists()
    preflight.check_rl_settings(load("ppo-toy", "rollout.n_samples=1"))  # PPO needs no group


# --- 5. prompts longer than the model's context or data.max_prompt_tokens -------------------------


def test_prompt_and_response_budget_over_the_model_context(good_run, tiny_model_dir):
    """vLLM's context is data.max_prompt_tokens + rollout.max_tokens; over the model's
    max_position_embeddings vLLM would fail inside the rollout actor after Ray started."""
    train_fails(good_run, "grpo-toy", "rollout.max_tokens=100", expected=[  # the toy policy is not built yet
        "data.max_prompt_tokens + rollout.max_tokens = 64 + 100 = 164 tokens, more than the model's context of 128",
        "the toy model (sft-toy)",
    ])
    assert not (good_run / "sft").exists()
    train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", "data.max_prompt_tokens=120", "--resume",
                expected=["= 120 + 24 = 144 tokens", f"max_position_embeddings in {tiny_model_dir / 'config.json'}"])


def test_model_context_as_vllm_derives_it():
    assert preflight.model_context({"max_position_embeddings": 128}) == (128, "max_position_embeddings")
    assert preflight.model_context({"n_positions": 1024, "n_ctx": 1024}) == (1024, "n_positions")  # GPT-2
    assert preflight.model_context({"max_position_embeddings": 4096, "seq_length": 2048}) == (2048, "seq_length")
    assert preflight.model_context({"text_config": {"max_position_embeddings": 64}}) == (64, "max_position_embeddings")
    assert preflight.model_context({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default"}})
    # RoPE scaling stretches the context in vLLM: no false alarm
    yarn = {"type": "yarn", "factor": 4}
    assert preflight.model_context({"max_position_embeddings": 4096, "rope_scaling": yarn}) is None
    assert preflight.model_context({"hidden_size": 64}) is None


def test_rl_prompt_longer_than_max_prompt_tokens_is_an_error(good_run, tiny_model_dir):
    """RL does not truncate prompts (see the module docstring): exit 2 before Ray starts."""
    proc = train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", "data.max_prompt_tokens=2", "--resume",
                       expected=["data.max_prompt_tokens: ", "prompts are longer than 2 tokens",
                                 "RL does not truncate prompts"])
    assert "resumed from" not in proc.stdout  # refused before the checkpoint was loaded


def test_sft_truncates_long_rows_and_says_so(tiny_model_dir):
    from transformers import AutoTokenizer

    from services.learner.sft_data import IGNORE, encode_example, truncation_warning

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    counts = {"prompt": 0, "response": 0}
    long_prompt = "list 3 fruits: " * 20
    ids, labels = encode_example(tokenizer, long_prompt, " apple mango plum", 8, 32, counts)
    assert labels[:8] == [IGNORE] * 8 and labels[8] != IGNORE  # the prompt kept its last 8 tokens
    encode_example(tokenizer, "12+7=", " 19" * 40, 8, 4, counts)
    encode_example(tokenizer, "12+7=", "19", 8, 4, counts)
    assert counts == {"prompt": 1, "response": 1}
    warning = truncation_warning(counts, 3, 8, 4)
    assert "1 of 3 prompts are longer than data.max_prompt_tokens=8" in warning
    assert "1 of 3 responses are longer than data.max_response_tokens=4" in warning
    assert truncation_warning({"prompt": 0, "response": 0}, 3, 8, 4) is None


# --- 6. empty datasets / 7. non-UTF-8 lines -----------------------------------------------------


def stage_fails(command: str, preset: str, out: Path, data: Path, expected: list[str]) -> None:
    before, data_bytes = snapshot(out), data.read_bytes()
    proc = flywheel(command, preset, "--out", str(out), "--overwrite", f"data.source={data}")  # out holds an SFT
    assert_user_error(proc, *expected)
    assert snapshot(out) == before and data.read_bytes() == data_bytes


@pytest.mark.parametrize("command, preset", [("sft", "sft-toy"), ("train-rm", "rm-toy")])
@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank-lines"])
def test_empty_dataset(good_sft, tmp_path, command, preset, content):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(content)
    stage_fails(command, preset, good_sft, data, [f"data.source: dataset {data} has no rows"])


@pytest.mark.parametrize("command, preset, row", [
    ("sft", "sft-toy", {"prompt": "2+2=", "response": "4"}),
    ("train-rm", "rm-toy", {"prompt": "2+2=", "chosen": "4", "rejected": "5"}),
])
def test_non_utf8_line_names_file_and_line(good_sft, tmp_path, command, preset, row):
    data = tmp_path / "rows.jsonl"
    good = json.dumps(row).encode() + b"\n"
    data.write_bytes(good + good + b'{"prompt": "caf\xe9", "response": "x"}\n' + good)  # latin-1, line 3
    stage_fails(command, preset, good_sft, data,
                [f"{data}:3: not valid UTF-8 (byte 0xe9 at byte 16 of the line); jsonl files must be UTF-8"])


# --- 8. reward functions that raise or return garbage (no Ray; the Ray path is in tests/e2e) -------

REWARDS = '''
import math

def boom(prompts, completions, **columns):
    return [float(columns["answer"][0])] * len(prompts)

def nan_at_1(prompts, completions, **columns):
    return [0.0, math.nan] + [0.0] * (len(prompts) - 2)

def one_short(prompts, completions, **columns):
    return [0.0] * (len(prompts) - 1)

def nothing(prompts, completions, **columns):
    return None

def strings(prompts, completions, **columns):
    return ["1.0"] * len(prompts)

def numpy_floats(prompts, completions, **columns):
    import numpy
    return numpy.array([0.5] * len(prompts))
'''


@pytest.mark.parametrize("fn, expected", [
    ("boom", r"reward scorer 'flaky' \(reward\.scorers\.0, python .*rewards\.py:boom\) raised KeyError: 'answer' "
             r"\(at .*rewards\.py:5 in boom\)"),
    ("nan_at_1", r"reward scorer 'flaky': score at index 1 is not finite: nan"),
    ("one_short", r"reward scorer 'flaky': wrong number of scores: expected 3, got 2"),
    ("nothing", r"reward scorer 'flaky': expected a list of 3 floats, got NoneType"),
    ("strings", r"reward scorer 'flaky': score at index 0 is a str, not a number: '1.0'"),  # issue #22: was coerced
])
def test_reward_function_failure_names_the_scorer(tmp_path, fn, expected):
    """The member actor's body (ScorerActor) without Ray: never a silent 0 or None."""
    from ray.exceptions import RayTaskError

    from services.core.config import ScorerConfig
    from services.reward.ensemble import ScorerActor
    from services.reward.scorers import ScorerError, ScorerOutputError

    (tmp_path / "rewards.py").write_text(REWARDS)
    actor = ScorerActor(ScorerConfig(kind="python", path=f"{tmp_path / 'rewards.py'}:{fn}", name="flaky"), 0)
    with pytest.raises((ScorerError, ScorerOutputError), match=expected) as info:
        actor.score(["a", "bb", "ccc"], ["x", "y", "z"])
    assert 'flywheel_errors_total{method="score",replica="0/flaky",service="reward"} 1.0' in actor.metrics_text()
    # what `flywheel train` prints: the actor's message without Ray's remote traceback, with the step
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    remote = RayTaskError("ScorerActor.score", "Traceback (most recent call last):\n  ...", info.value)
    error = preflight.actor_user_error(remote, metrics)
    assert isinstance(error, UserError) and str(error).startswith(f"step 3: {info.value}")
    assert "Traceback" not in str(error) and "--resume" in str(error)
    assert str(preflight.actor_user_error(remote, None)) == str(info.value)  # failed while starting
    other = RayTaskError("RolloutWorker.generate", "Traceback ...", RuntimeError("engine died"))
    assert preflight.actor_user_error(other, metrics) is None  # a crash stays a crash (exit 1, traceback)


@pytest.mark.parametrize("path, expected", [
    ("{d}/missing.py:fn", "reward.scorers.0.path: no python file '{d}/missing.py'"),
    ("{d}/rewards.py:absent", "reward.scorers.0.path: '{d}/rewards.py' has no function 'absent'"),
    ("{d}/rewards.py", "reward.scorers.0.path: expected 'path/to/file.py:function' or 'package.module:function'"),
    ("{d}/broken.py:fn", "reward.scorers.0.path: importing '{d}/broken.py' failed: SyntaxError"),
], ids=["missing-file", "missing-function", "no-function-named", "syntax-error"])
def test_python_reward_function_problems_fail_before_ray_starts(good_run, tmp_path, path, expected):
    """Issue #22: these were reported ~17 s in, after Ray, the learner and the reference had
    started (and OUT/logs was made); now before anything starts, OUT untouched."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "broken.py").write_text("def fn(prompts, completions:\n    return []\n")
    override = "reward.scorers=[{kind: python, name: mine, path: %s}]" % path.format(d=tmp_path)
    train_fails(good_run, "grpo-toy", override, expected=[expected.format(d=tmp_path)])
    assert (tmp_path / "rewards.py").read_text() == REWARDS


def test_a_numpy_array_of_floats_is_a_fine_reward(tmp_path):
    from services.core.config import ScorerConfig
    from services.reward.ensemble import ScorerActor

    (tmp_path / "rewards.py").write_text(REWARDS)
    actor = ScorerActor(ScorerConfig(kind="python", path=f"{tmp_path / 'rewards.py'}:numpy_floats", name="np"), 0)
    scores, _ = actor.score(["a", "bb"], ["x", "y"])
    assert scores == [0.5, 0.5]


# --- 9. resuming a checkpoint of another model; exporting a non-checkpoint ------------------------


@pytest.mark.parametrize("fingerprint, algorithm, expected", [
    (STALE_MODEL, "grpo", "was saved from a different model than model.path"),
    (None, "ppo", "is a ppo run, the config says grpo"),
])
def test_resume_from_a_checkpoint_of_another_model_or_algorithm(good_run, tmp_path, tiny_model_dir, fingerprint,
                                                                algorithm, expected):
    """Refused from driver_state.json and config.json alone, before Ray and any learner state."""
    other = make_checkpoint(tmp_path / "other" / "checkpoints", 7, fingerprint or model_fingerprint(tiny_model_dir),
                            algorithm)
    before = snapshot(other)
    proc = train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", f"checkpoint.resume_from={other}",
                       expected=[f"checkpoint: '{other}' ", expected])
    assert "resumed from" not in proc.stdout and snapshot(other) == before


def test_resume_with_a_damaged_driver_state(good_run, tiny_model_dir):
    state = CheckpointStore(good_run / "checkpoints").latest() / "driver_state.json"
    state.write_text('{"format_version": 1, "step": 2, "algorithm": "gr')
    train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", "--resume",
                expected=[f"checkpoint: {state} is not valid JSON", "the checkpoint is damaged"])


def test_export_refuses_what_is_not_a_checkpoint(good_run, tmp_path):
    target = tmp_path / "exported"
    not_a_checkpoint = tmp_path / "some-dir"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "model.safetensors").write_bytes(b"x")
    for source, expected in [
        (not_a_checkpoint, f"export: no complete Flywheel checkpoint at '{not_a_checkpoint}'"),
        (tmp_path / "missing", "export: no complete Flywheel checkpoint at"),
        (CheckpointStore(good_run / "checkpoints").latest(), "holds no DeepSpeed policy checkpoint"),
    ]:
        assert_user_error(flywheel("export", str(source), str(target)), expected)
        assert not target.exists()


# --- 10. a gRPC request over the size limit -------------------------------------------------------


def test_remote_scorer_request_over_the_size_limit_names_the_setting(monkeypatch):
    """Refused by the client before anything is sent (no server listens at the address). The
    server's side of the limit and the CLI server are in tests/integration/test_reward_grpc.py."""
    from services.core.config import ScorerConfig
    from services.reward.ensemble import ScorerActor
    from services.reward.scorers import ScorerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    actor = ScorerActor(ScorerConfig(kind="remote", address=address, max_message_mb=0.01, name="far-rm"), 0)
    with pytest.raises(ScorerError) as info:
        actor.score(["12+7="] * 4, ["x" * 4000] * 4)
    message = str(info.value)
    assert message.startswith("reward scorer 'far-rm' (reward.scorers.0) raised RemoteRewardError: ")
    assert "over the client's limit of 0.01 MiB" in message and "reward.scorers.N.max_message_mb" in message
    assert actor.scorer.client.last_attempts == 0  # never sent


# --- 11. the metrics port is taken --------------------------------------------------------------


def test_metrics_port_in_use_fails_before_anything_starts(good_run):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = train_fails(good_run, "grpo-toy", f"metrics.prometheus_port={port}", "--resume", expected=[
            f"metrics.prometheus_port: cannot serve on 127.0.0.1:{port}: Address already in use",
            "choose another metrics.prometheus_port",
        ])
    assert "resumed from" not in proc.stdout and not (good_run / "sft").exists()  # before the toy SFT too
    train_fails(good_run, "grpo-toy", "metrics.prometheus_port=9100", "metrics.ray_metrics_port=9100", "--resume",
                expected=["metrics.prometheus_port and metrics.ray_metrics_port are both 9100"])


def test_metrics_host_and_ray_metrics_port_problems(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh CLI process (no Ray running yet)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UserError, match=rf"metrics\.ray_metrics_port: cannot serve on 0\.0\.0\.0:{port}: "
                                            "Address already in use"):
            preflight.check_ports(load("grpo-toy", f"metrics.ray_metrics_port={port}"))
    with pytest.raises(UserError, match=r"metrics\.prometheus_host: cannot serve on no-such-host\.invalid:9100"):
        preflight.check_ports(
            load("grpo-toy", "metrics.prometheus_port=9100", "metrics.prometheus_host=no-such-host.invalid")
        )
    preflight.check_ports(load("grpo-toy", "metrics.prometheus_port=0"))  # 0: the OS picks one


# --- issue #22's smaller cases -----------------------------------------------------------------


def test_sft_rows_whose_response_is_only_whitespace_are_named_in_a_warning(tmp_path, capsys):
    """Issue #22: they were trained on silently. Still trained on (an empty answer can be meant)."""
    from services.learner.sft_data import sft_rows

    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "  \n"},
            {"prompt": "1+1=", "response": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load("sft-toy", f"data.source={data}")
    assert [r["response"] for r in sft_rows(cfg)] == ["4", "  \n", ""]
    assert (f"warning: 2 of 3 rows of {data} have a 'response' that is empty or only whitespace (the first: row 2)"
            in capsys.readouterr().err)


@pytest.mark.parametrize("host_args, expected", [
    (["reward.server.host=999.1.1.1"], "reward.server.host: '999.1.1.1' is not a valid IP address"),
    (["--host", "no-such-host.invalid"], "reward.server.host: cannot resolve 'no-such-host.invalid'"),
], ids=["bad-ip", "unresolvable-name"])
def test_serve_reward_on_a_host_that_cannot_be_bound_names_the_host(host_args, expected):
    """Issue #22: it talked about the bearer token instead (the host is not loopback)."""
    proc = flywheel("serve-reward", "grpo-toy", *host_args)
    assert_user_error(proc, expected)
    assert "token" not in proc.stderr


