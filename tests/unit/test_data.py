"""services.core.data.load_rows: jsonl, parquet, datasets directories, and the errors users see."""

from __future__ import annotations

import re

import pytest

from services.core.data import load_rows, write_jsonl
from services.core.errors import UserError

KEYS = ["prompt", "response"]
FIELDS = {"prompt": "data.prompt_key", "response": "data.response_key"}
ROWS = [
    {"prompt": "2+2=", "response": "4", "id": 0},
    {"prompt": "Say hi", "response": "hi", "id": 1},
]


def test_jsonl_ok_skips_blank_lines(tmp_path):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, ROWS)
    path.write_text(path.read_text() + "\n   \n")
    rows = load_rows(str(path), KEYS)
    assert rows == ROWS


def test_jsonl_missing_key_names_file_line_key_and_field(tmp_path):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [ROWS[0], {"prompt": "p", "answer": "a"}])
    with pytest.raises(UserError) as info:
        load_rows(str(path), KEYS, key_fields=FIELDS)
    msg = str(info.value)
    assert f"{path}:2:" in msg
    assert "'response'" in msg
    assert "data.response_key" in msg
    assert "'answer'" in msg  # the keys that are there


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(UserError, match=r"sft\.jsonl:3: missing key 'response'"):
        load_rows(str(path), KEYS)


def test_jsonl_non_string_and_non_object(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(UserError, match=r"sft\.jsonl:1: key 'response'.*must be a string, got int"):
        load_rows(str(path), KEYS, key_fields=FIELDS)
    path.write_text('["a", "b"]\n')
    with pytest.raises(UserError, match=r"sft\.jsonl:1: expected a JSON object, got list"):
        load_rows(str(path), KEYS)


def test_jsonl_invalid_json(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: invalid JSON \("):
        load_rows(str(path), KEYS)


def test_jsonl_other_keys_for_reward_stage(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert load_rows(str(path), ["prompt", "chosen", "rejected"]) == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


def test_empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        load_rows(str(path), KEYS)


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.parquet"])
def test_missing_file(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(UserError, match=f"^data.source: file not found: {re.escape(str(path))}$"):
        load_rows(str(path), KEYS)


def _write_parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_ok(tmp_path):
    path = tmp_path / "sft.parquet"
    _write_parquet(path, {"prompt": ["a", "b"], "response": ["x", "y"]})
    assert load_rows(str(path), KEYS) == [{"prompt": "a", "response": "x"}, {"prompt": "b", "response": "y"}]


def test_parquet_missing_column_lists_columns(tmp_path):
    path = tmp_path / "sft.parquet"
    _write_parquet(path, {"question": ["a"], "response": ["x"]})
    with pytest.raises(UserError) as info:
        load_rows(str(path), KEYS, key_fields=FIELDS)
    msg = str(info.value)
    assert str(path) in msg and "'prompt'" in msg and "data.prompt_key" in msg
    assert "question, response" in msg


def test_parquet_null_value_names_row(tmp_path):
    path = tmp_path / "sft.parquet"
    _write_parquet(path, {"prompt": ["a", "b", None], "response": ["x", "y", "z"]})
    with pytest.raises(UserError, match=r"sft\.parquet: row 2: column 'prompt'.*got null"):
        load_rows(str(path), KEYS)


def test_parquet_unreadable(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("not parquet")
    with pytest.raises(UserError, match="could not read parquet"):
        load_rows(str(path), KEYS)


def test_datasets_dir_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"prompt": "a", "response": "x"}]),
        test=datasets.Dataset.from_list([{"prompt": "b", "response": "y"}]),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd"), KEYS) == [{"prompt": "a", "response": "x"}]
    assert load_rows(str(tmp_path / "dd"), KEYS, split="test") == [{"prompt": "b", "response": "y"}]
    with pytest.raises(UserError, match=r"split 'validation'.*splits: train, test"):
        load_rows(str(tmp_path / "dd"), KEYS, split="validation")


def test_datasets_dir_single_dataset_and_checks(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "response": "x"}]).save_to_disk(str(tmp_path / "d"))
    assert load_rows(str(tmp_path / "d"), KEYS) == [{"prompt": "a", "response": "x"}]
    with pytest.raises(UserError, match=r"missing column 'chosen'; columns present: prompt, response"):
        load_rows(str(tmp_path / "d"), ["prompt", "chosen"])

    datasets.Dataset.from_list([{"prompt": "a", "response": "x"}, {"prompt": "b", "response": None}]).save_to_disk(
        str(tmp_path / "n")
    )
    with pytest.raises(UserError, match=r"row 1: column 'response'"):
        load_rows(str(tmp_path / "n"), KEYS)


def test_hub_name_failure_is_user_error(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise FileNotFoundError("Couldn't find a dataset script or data files\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(UserError, match=r"^data.source: could not load dataset 'someone/nothing': Couldn't find"):
        load_rows("someone/nothing", KEYS)


def test_hub_name_calls_load_dataset_with_split(monkeypatch):
    import datasets

    seen = {}

    def fake(name, split):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list([{"prompt": "a", "response": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("org/data", KEYS, split="eval") == [{"prompt": "a", "response": "x"}]
    assert seen == {"name": "org/data", "split": "eval"}
