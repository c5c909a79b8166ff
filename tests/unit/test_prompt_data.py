"""RL prompts from a user's dataset (services/driver/prompt_data.py): string and chat-messages
prompts, columns, stable ids, overlong prompts, and every bad input named by file, line and key."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.core.config import FlywheelConfig
from services.core.data import write_jsonl
from services.core.errors import UserError
from services.core.tiny_model import train_toy_tokenizer
from services.driver.prompt_data import file_rows, render_items, rl_prompts

def rl_prompt_items(cfg, policy) -> list[dict]:
    """The run's training prompts, as `flywheel train` loads them."""
    return rl_prompts(cfg, policy)[0]


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["What is 3 plus 4? 3 + 4 = 7 #### 7", "Sam has 5 pens and loses 2. 5 - 2 = 3 #### 3", "system user assistant"]


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """Two tokenizer-only policy directories: without a chat template and with one."""
    root = tmp_path_factory.mktemp("policies")
    plain, chat = root / "plain", root / "chat"
    tokenizer = train_toy_tokenizer(TEXTS * 20, vocab_size=320)
    tokenizer.save_pretrained(plain)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(chat)
    return plain, chat


def config(source, **data) -> FlywheelConfig:
    reward = data.pop("reward", {"scorers": [{"kind": "math_verify"}]})
    return FlywheelConfig(data={"source": str(source), **data}, reward=reward, algorithm={"name": "grpo"})


def test_string_prompts_keep_their_columns_and_get_stable_ids(tmp_path, policies):
    from transformers import AutoTokenizer

    plain, _ = policies
    rows = [{"question": "What is 3 plus 4?", "answer": "7", "level": 1},
            {"question": "Sam has 5 pens and loses 2.", "answer": "3", "level": 2}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    items = rl_prompt_items(config(tmp_path / "p.jsonl", prompt_key="question"), plain)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    assert [it["prompt"] for it in items] == [r["question"] for r in rows]
    assert [it["prompt_ids"] for it in items] == [tokenizer(r["question"]).input_ids for r in rows]  # no template
    assert [it["columns"] for it in items] == [{"answer": "7", "level": 1}, {"answer": "3", "level": 2}]
    digest = hashlib.sha256(json.dumps(rows[1], sort_keys=True).encode()).hexdigest()[:10]
    assert items[1]["id"] == f"1-{digest}"
    assert [it["id"] for it in rl_prompt_items(config(tmp_path / "p.jsonl", prompt_key="question"), plain)] == [
        it["id"] for it in items]  # the same ids on every load
    by_key = rl_prompt_items(config(tmp_path / "p.jsonl", prompt_key="question", id_key="level"), plain)
    assert [it["id"] for it in by_key] == ["1", "2"]


def test_chat_prompts_go_through_the_template_with_the_system_prompt(tmp_path, policies):
    from transformers import AutoTokenizer

    _, chat = policies
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "What is 3 plus 4?"}]
    write_jsonl(tmp_path / "m.jsonl", [{"messages": messages, "answer": 7}, {"messages": "Sam has 5 pens.", "answer": 5}])
    items = rl_prompt_items(config(tmp_path / "m.jsonl", prompt_key="messages", system_prompt="Be brief."), chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    first = "<|system|>Be brief.<|eos|><|user|>hi<|eos|><|assistant|>yes<|eos|><|user|>What is 3 plus 4?<|eos|><|assistant|>"
    second = "<|system|>Be brief.<|eos|><|user|>Sam has 5 pens.<|eos|><|assistant|>"  # a string: one user message
    assert [it["prompt_ids"] for it in items] == [tokenizer(t, add_special_tokens=False).input_ids for t in (first, second)]
    assert [it["prompt"] for it in items] == ["What is 3 plus 4?", "Sam has 5 pens."]  # what reward functions see
    assert items[0]["columns"] == {"answer": 7}
    cfg = config(tmp_path / "m.jsonl", prompt_key="messages")  # model.chat_template replaces the tokenizer's
    cfg.model.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert rl_prompt_items(cfg, chat)[1]["prompt_ids"] == tokenizer("[Sam has 5 pens.]", add_special_tokens=False).input_ids


def test_overlong_prompts_are_an_error_or_skipped_and_counted(tmp_path, policies, capsys):
    plain, _ = policies
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 3 plus 4?", "answer": "7"},
                                       {"prompt": "What " * 40, "answer": "1"}, {"prompt": "hi", "answer": "2"}])
    with pytest.raises(UserError) as err:
        rl_prompt_items(config(tmp_path / "p.jsonl", max_prompt_tokens=20), plain)
    assert "1 of 3 prompts are longer than 20 tokens" in str(err.value)
    assert f"at {tmp_path / 'p.jsonl'}:2" in str(err.value) and "data.overlong_prompts: skip" in str(err.value)
    items = rl_prompt_items(config(tmp_path / "p.jsonl", max_prompt_tokens=20, overlong_prompts="skip"), plain)
    assert [it["columns"]["answer"] for it in items] == ["7", "2"]
    assert "left out 1 of 3 prompts longer than data.max_prompt_tokens=20" in capsys.readouterr().out


BAD_ROWS = [  # (rows, extra data settings, words the message holds)
    ([{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}], {},
     [":2: missing key 'prompt' (set by data.prompt_key", "keys present: 'question', 'answer'"]),
    ([{"prompt": {"role": "user"}, "answer": "1"}], {}, [":1: key 'prompt'", "must be a string or a chat messages list, got dict"]),
    ([{"prompt": [{"role": "tool", "content": "x"}], "answer": "1"}], {}, [":1: key 'prompt'", "message 0 has role 'tool'"]),
    ([{"prompt": [{"role": "user", "content": 3}], "answer": "1"}], {}, ["message 0 (user) content must be a string, got int"]),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "b"}, {"prompt": "c"}], {},
     [":2: no value for column 'answer', which reward scorer 'math_verify-0' (reward.scorers.0) reads"]),
    ([{"prompt": "a", "answer": "1", "qid": "x"}, {"prompt": "b", "answer": "2", "qid": "x"}], {"id_key": "qid"},
     [":2: data.id_key 'qid' value 'x' repeats", ":1"]),
    ([{"prompt": "a", "answer": "1"}], {"id_key": "qid"}, [":1: missing key 'qid' (set by data.id_key)"]),
]


@pytest.mark.parametrize("rows, data, words", BAD_ROWS,
                         ids=["no-prompt-key", "messages-not-a-list", "bad-role", "non-string-content",
                              "reward-column-missing", "duplicate-id", "no-id-key"])
def test_bad_rows_name_the_file_line_and_key(tmp_path, policies, rows, data, words):
    _, chat = policies
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as err:
        rl_prompt_items(config(tmp_path / "bad.jsonl", **data), chat)
    assert str(err.value).startswith(str(tmp_path / "bad.jsonl"))
    for word in words:
        assert word in str(err.value)


def test_messages_without_a_chat_template_and_a_system_prompt_without_one_are_errors(tmp_path, policies):
    plain, _ = policies
    write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}])
    with pytest.raises(UserError, match=r"m\.jsonl:1: key 'prompt' is a chat messages list, but the tokenizer has "
                                        "no chat template; set model.chat_template"):
        rl_prompt_items(config(tmp_path / "m.jsonl"), plain)
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "answer": "1"}])
    with pytest.raises(UserError, match="data.system_prompt: the tokenizer has no chat template"):
        rl_prompt_items(config(tmp_path / "s.jsonl", system_prompt="Be brief."), plain)


def test_parquet_rows_are_named_by_row(tmp_path, policies):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policies[0])
    source = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), source)
    with pytest.raises(UserError, match=r"p\.parquet: row 1: no value for column 'answer'"):
        file_rows(config(source), tokenizer, str(source))
    toy_reward = config(source, reward={})  # the toy gold scorer reads no column
    kept, overlong = render_items(toy_reward, tokenizer, file_rows(toy_reward, tokenizer, str(source)))
    assert [it["prompt"] for it in kept] == ["a", "b"] and [it["columns"] for it in kept] == [
        {"answer": "1"}, {"answer": None}] and overlong == []


def test_flywheel_train_exits_2_on_a_bad_row_before_writing_anything(tmp_path, policies):
    """The path users run: `flywheel train` names the file, line and key, exit 2, no traceback,
    and OUT is not created (nothing to clean up, nothing lost)."""
    from tests.conftest import run_flywheel

    _, chat = policies
    (chat / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 128}')
    write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "1"}, {"question": [{"role": "bot", "content": "b"}]}])
    out = tmp_path / "out"
    proc = run_flywheel("train", "grpo-math", "--out", str(out), f"model.path={chat}", f"data.source={tmp_path / 'p.jsonl'}",
                        "data.eval_source=null", "algorithm.eval_every=0", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: {tmp_path / 'p.jsonl'}:2: key 'question' (set by data.prompt_key" in proc.stderr
    assert "message 0 has role 'bot'" in proc.stderr
    assert not out.exists()


def test_datasets_directories_and_the_held_out_prompts(tmp_path, policies):
    import datasets

    plain, _ = policies
    rows = [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]), "test": datasets.Dataset.from_list(rows[8:])}
                         ).save_to_disk(str(tmp_path / "ds"))
    cfg = config(tmp_path / "ds", eval_source=str(tmp_path / "ds"))
    cfg.algorithm.eval_every = 5
    train, held = rl_prompts(cfg, plain)
    assert [it["columns"]["answer"] for it in train] == [str(i + 1) for i in range(8)]  # data.split: train
    assert [it["columns"]["answer"] for it in held] == ["9", "10"]  # data.eval_split: test
    cfg.data.eval_split = "dev"
    with pytest.raises(UserError, match="data.eval_split: split 'dev' not in"):
        rl_prompts(cfg, plain)

    write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = config(tmp_path / "p.jsonl", eval_fraction=0.2)
    cfg.algorithm.eval_every = 5
    train, held = rl_prompts(cfg, plain)
    assert len(train) == 8 and len(held) == 2 and not {t["id"] for t in train} & {h["id"] for h in held}
    assert [h["id"] for h in rl_prompts(cfg, plain)[1]] == [h["id"] for h in held]  # the same split every time
    assert rl_prompts(config(tmp_path / "p.jsonl", eval_fraction=0.2), plain)[1] == []  # no eval_every: no split

    write_jsonl(tmp_path / "long.jsonl", [{"prompt": "What " * 40, "answer": "1"}])
    cfg = config(tmp_path / "p.jsonl", eval_source=str(tmp_path / "long.jsonl"), max_prompt_tokens=20,
                 overlong_prompts="skip")
    cfg.algorithm.eval_every = 5
    with pytest.raises(UserError, match=r"all 1 prompts are longer than 20 tokens.*\(the held-out prompts\)"):
        rl_prompts(cfg, plain)  # an eval set that is empty after filtering
