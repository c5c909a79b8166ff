"""Multi-turn building blocks (issue #19), no engine: the Python tool's sandbox stopping code
that loops, hogs memory, opens a socket or floods its output; the calculator and the tool-call
formats; the checks around a user's environment; an episode's token layout and loss mask on
hand-made turns, through a ChatML template's turn separators (the ids trained on are the ids
sampled); ``pack_sequences`` with loss masks."""

from __future__ import annotations

import time

import pytest
import torch

from services.core.batch_types import pack_sequences
from services.core.errors import UserError
from services.environments.base import EnvironmentFailure, checked_reset, checked_step, environment_class
from services.environments.episode import Episode, observation_ids
from services.environments.sandbox import SandboxLimits, network_isolation, run_python
from services.environments.tools import ToolCall, calculate, find_tool_calls, run_tool

LIMITS = SandboxLimits(cpu_s=1, wall_s=3, memory_mb=256, output_chars=100)
needs_netns = pytest.mark.skipif(network_isolation()[1] is not None, reason=f"{network_isolation()[1]}")


# ---------------------------------------------------------------- the sandbox


@needs_netns
def test_sandbox_runs_code_in_a_scratch_directory_that_is_deleted():
    result = run_python("import os; print(os.getcwd()); open('x.txt', 'w').write('1')", LIMITS)
    assert result.ok and result.stdout.startswith("/tmp/flywheel-sandbox-"), result
    import os

    assert not os.path.exists(result.stdout.strip())


@needs_netns
@pytest.mark.parametrize("code, stopped_by, within_s", [
    ("while True: pass", "cpu", 1 + 2),                       # RLIMIT_CPU 1 s
    ("x = bytearray(1024 ** 3)", "memory", 3),                 # RLIMIT_AS 256 MB: MemoryError inside
    ("import time; time.sleep(60)", "wall", 3 + 2),            # wall clock 3 s, process group killed
    ("import os, time\nos.fork()\ntime.sleep(60)", "wall", 3 + 2),  # its child too
    ("while True: print('a' * 10_000)", "output", 3),           # a flood: SIGXFSZ at 64 kB of file
])
def test_sandbox_stops_code_at_its_limits_and_says_so(code, stopped_by, within_s):
    started = time.monotonic()
    result = run_python(code, LIMITS)
    assert result.stopped_by == stopped_by, result
    assert time.monotonic() - started < within_s
    if stopped_by == "output":  # what it wrote before, cut to 100 characters
        assert result.stdout.startswith("a" * 100 + "\n[... ") and "more characters cut]" in result.stdout


@needs_netns
def test_sandbox_output_is_cut_to_what_the_policy_reads():
    result = run_python("print('a' * 10_000)\nraise ValueError('the end of the error')", LIMITS)
    assert result.stdout == "a" * 100 + "\n[... 9901 more characters cut]"  # the start of the output
    assert result.stderr.endswith("ValueError: the end of the error\n")  # the end of the error
    assert result.stopped_by is None and result.exit_code == 1


@needs_netns
def test_sandbox_has_no_network():
    for code in ("import socket; socket.create_connection(('127.0.0.1', 22), timeout=2)",
                 "import urllib.request; urllib.request.urlopen('http://example.com', timeout=2)"):
        result = run_python(code, LIMITS)
        assert not result.ok and ("Network is unreachable" in result.stderr or "URLError" in result.stderr), result
    assert "Network is unreachable" in run_tool(ToolCall("python", "import socket\nsocket.create_connection(('127.0.0.1', 22))", (0, 0)), LIMITS).text


# ---------------------------------------------------------------- tools


def test_calculator():
    assert calculate("12*(3+4)") == 84 and calculate("7/2") == 3.5 and calculate("-2**3") == -8
    assert calculate("10 // 4 + 10 % 4") == 4 and isinstance(calculate("6/3"), int)
    for bad, says in (("__import__('os')", "only numbers"), ("2**100", "exponent"), ("1/0", "division by zero"),
                      ("x + 1", "only numbers"), ("(9**64)**64", "out of range"), ("(" * 300 + "1" + ")" * 300, "longer")):
        with pytest.raises(ValueError, match=says):
            calculate(bad)


def test_tool_calls_in_both_formats_and_errors_the_policy_reads_back():
    text = "First <tool>calculator</tool><args>3*4</args>, then <tool> calculator </tool> <args> 1/0 </args>."
    calls = find_tool_calls(text)
    assert [(c.name, c.args) for c in calls] == [("calculator", "3*4"), ("calculator", "1/0")]
    assert [run_tool(c) for c in calls][0].text == "12"
    assert run_tool(calls[1]).error and run_tool(calls[1]).text == "error: division by zero"
    qwen = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5-2"}}\n</tool_call><tool_call>{oops}</tool_call>'
    calls = find_tool_calls(qwen, "json")
    assert [(c.name, c.args) for c in calls] == [("calculator", "5-2"), ("?", "{oops}")]
    assert run_tool(calls[1]).error and "no tool '?'" in run_tool(calls[1]).text
    assert [c.name for c in find_tool_calls("CALL[calculator](2+2)", r"CALL\[(?P<name>\w+)\]\((?P<args>[^)]*)\)")] == ["calculator"]


# ---------------------------------------------------------------- environments


class Raising:
    def reset(self, row):
        raise KeyError("answer")

    def step(self, text):
        return "obs", None, {}


class WrongTypes:
    def reset(self, row):
        return {"prompt": row["prompt"]}

    def step(self, text):
        return ("obs", "1.0", {}) if "reward" in text else ["obs", None, {}]


def test_the_tools_environment_runs_calls_and_ends_on_an_answer():
    env = environment_class("tools")(tools=["calculator"], system_prompt="Use <tool>calculator</tool><args>...</args>.")
    assert checked_reset(env, "tools", {"prompt": "What is 3*4+5?"}, "row-1") == [
        {"role": "system", "content": "Use <tool>calculator</tool><args>...</args>."},
        {"role": "user", "content": "What is 3*4+5?"}]
    step = checked_step(env, "tools", "<tool>calculator</tool><args>3*4+5</args>", "row-1", 1)
    assert step.observation == "<result>17</result>" and step.info == {"tool_calls": 1, "tool_errors": 0}
    step = checked_step(env, "tools", "<tool>python</tool><args>print(1)</args>", "row-1", 2)
    assert "not available here" in step.observation and step.info["tool_errors"] == 1
    assert checked_step(env, "tools", "The answer is 17.", "row-1", 3).done


def test_a_broken_environment_is_named_with_its_call_and_row(tmp_path):
    with pytest.raises(EnvironmentFailure, match=r"environment 'mine' reset on row 'row-7' raised KeyError: 'answer'"):
        checked_reset(Raising(), "mine", {"prompt": "p"}, "row-7")
    with pytest.raises(EnvironmentFailure, match=r"reset on row 'row-7' returned dict"):
        checked_reset(WrongTypes(), "mine", {"prompt": "p"}, "row-7")
    with pytest.raises(EnvironmentFailure, match=r"step 2 on row 'row-7' returned list, not \(observation, reward, info\)"):
        checked_step(WrongTypes(), "mine", "text", "row-7", 2)
    with pytest.raises(EnvironmentFailure, match=r"step 1 on row 'row-7': the reward is str"):
        checked_step(WrongTypes(), "mine", "reward", "row-7", 1)
    source = tmp_path / "envs.py"
    source.write_text("class NotAnEnv:\n    pass\n")
    with pytest.raises(UserError, match="not a class with reset"):
        environment_class(f"{source}:NotAnEnv")
    with pytest.raises(UserError, match="no built-in environment 'calculater'.*tools"):
        environment_class("calculater")


# ---------------------------------------------------------------- episodes: token in, token out


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from services.core.tiny_model import CHATML_TEMPLATE, train_chat_tokenizer

    tokenizer = train_chat_tokenizer(["What is 3*4+5? <tool>calculator</tool><args>3*4+5</args> <result>17</result> "
                                      "The answer is 17.", "system user assistant"], vocab_size=300)
    return tokenizer, CHATML_TEMPLATE


def test_episode_layout_and_mask_through_a_chatml_template(chatml_tokenizer):
    tokenizer, template = chatml_tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "What is 3*4+5?"}]
    prompt = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    episode = Episode(list(tokenizer(prompt, add_special_tokens=False).input_ids))
    # what an engine would have sampled: the ids of the call, then its end-of-turn token
    first = list(tokenizer("<tool>calculator</tool><args>3*4+5</args>", add_special_tokens=False).input_ids) + [end]
    episode.add_policy_turn(first, [-0.5] * len(first))
    observed = observation_ids(tokenizer, template, messages, first, "<result>17</result>")
    assert tokenizer.decode(observed, skip_special_tokens=False) == (
        "\n<|im_start|>user\n<result>17</result><|im_end|>\n<|im_start|>assistant\n")
    episode.add_environment_turn(observed)
    last = list(tokenizer("The answer is 17.", add_special_tokens=False).input_ids) + [end]
    episode.add_policy_turn(last, [-0.25] * len(last))
    n1, n2, n3 = len(first), len(observed), len(last)
    assert [(t.role, t.start, t.end) for t in episode.turns] == [
        ("policy", 0, n1), ("environment", n1, n1 + n2), ("policy", n1 + n2, n1 + n2 + n3)]
    assert episode.loss_mask == [1] * n1 + [0] * n2 + [1] * n3
    assert episode.logprobs == [-0.5] * n1 + [-0.25] * n3  # policy tokens only
    # the whole conversation, as the template writes it, is exactly the episode's tokens
    conversation = messages + [{"role": "assistant", "content": "<tool>calculator</tool><args>3*4+5</args>"},
                               {"role": "user", "content": "<result>17</result>"},
                               {"role": "assistant", "content": "The answer is 17."}]
    rendered = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    assert tokenizer.decode(episode.context_ids, skip_special_tokens=False) == rendered.rstrip("\n")
    # packed for the learner: the trained (mask 1) ids are the sampled ids, in order
    batch = pack_sequences([episode.prompt_ids, [5, 6]], [episode.response_ids, [7]], pad_id=0,
                           loss_masks=[episode.loss_mask, None])
    trained = batch.input_ids[0][batch.response_mask[0].bool()].tolist()
    assert trained == first + last == episode.policy_ids()
    assert batch.response_mask[1].tolist()[:3] == [0.0, 0.0, 1.0] and batch.response_mask[1].sum() == 1
    assert torch.equal(batch.input_ids[0][: len(episode.context_ids)], torch.tensor(episode.context_ids))


def test_an_environment_turn_after_a_stop_string_starts_with_the_end_of_turn(chatml_tokenizer):
    """A turn that a stop string ended has no <|im_end|> of its own: the environment's turn,
    context only, closes it as the template does."""
    tokenizer, template = chatml_tokenizer
    messages = [{"role": "user", "content": "What is 3*4+5?"}]
    stopped = list(tokenizer("The answer is", add_special_tokens=False).input_ids)
    observed = observation_ids(tokenizer, template, messages, stopped, "go on", role="tool")
    assert tokenizer.decode(observed, skip_special_tokens=False) == (
        "<|im_end|>\n<|im_start|>tool\ngo on<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="does not render the conversation as a continuation"):
        observation_ids(tokenizer, "{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}", messages, stopped, "x")


def test_pack_sequences_checks_the_loss_mask_length():
    with pytest.raises(ValueError, match="sequence 0: a loss mask of 2 for 3 response tokens"):
        pack_sequences([[1]], [[2, 3, 4]], pad_id=0, loss_masks=[[1, 0]])
    with pytest.raises(ValueError, match="a policy turn of 2 tokens with 1 log-probs"):
        Episode([1]).add_policy_turn([2, 3], [-1.0])


def test_the_engine_context_holds_the_episode_up_to_the_models_positions(tmp_path, capsys):
    from transformers import LlamaConfig

    from services.core.config import FlywheelConfig
    from services.rollout.vllm_engine import context_length

    LlamaConfig(max_position_embeddings=256).save_pretrained(tmp_path)
    single = FlywheelConfig.model_validate({"data": {"max_prompt_tokens": 64}, "rollout": {"max_tokens": 32}})
    assert context_length(str(tmp_path), single) == 96
    episodes = FlywheelConfig.model_validate({"data": {"max_prompt_tokens": 64}, "rollout": {
        "max_tokens": 32, "environment": {"name": "tools", "max_total_tokens": 128}}})
    assert context_length(str(tmp_path), episodes) == 192
    longer = episodes.model_copy(deep=True)
    longer.rollout.environment.max_total_tokens = 512
    assert context_length(str(tmp_path), longer) == 256
    assert "the model holds 256 positions, so episodes end there" in capsys.readouterr().out
