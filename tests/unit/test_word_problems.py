"""The GSM8K-format generator of `flywheel example` (services/core/word_problems.py)."""

from __future__ import annotations

import json
import re

from services.core.word_problems import tool_sft_rows, word_problems, write_splits
from services.reward.verifiable import math_verify_correct, reference_text


def test_rows_are_gsm8k_format_with_the_right_answer():
    rows = word_problems(300, seed=3)
    assert rows == word_problems(300, seed=3) and rows != word_problems(300, seed=4)  # seeded
    for row in rows:
        work, final = row["answer"].split("\n#### ")
        a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", work).groups()
        assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(final)
        assert int(result) >= 0 and row["question"].endswith("?")
        assert reference_text(row["answer"]) == final and math_verify_correct(f"#### {final}", row["answer"])
    assert {re.search(r"[-+*]", r["answer"]).group() for r in rows} == {"+", "-", "*"}


def test_splits_do_not_share_a_question(tmp_path):
    paths = write_splits(tmp_path, train=500, test=50, seed=0)
    train, test = ([json.loads(line) for line in paths[k].read_text().splitlines()] for k in ("train", "test"))
    assert len(train) == 500 and len(test) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in test}


def test_max_number_bounds_the_operands_and_the_default_keeps_the_dataset():
    operands = {"+": set(), "-": set(), "*": set()}
    for row in word_problems(600, seed=1, max_number=6):
        a, op, b = re.match(r"(\d+) ([-+*]) (\d+)", row["answer"]).groups()
        operands[op] |= {int(a), int(b)}
    assert max(operands["+"]) == 6 and min(operands["+"]) == 1
    assert max(operands["-"]) == 9 and min(operands["-"]) >= 1  # a minuend up to 1.5 x 6
    assert operands["*"] <= set(range(2, 6))
    # the default is the dataset `flywheel example` wrote before the option existed (seeded draws unchanged)
    assert word_problems(5, seed=0) == word_problems(5, seed=0, max_number=20)
    assert word_problems(5, seed=0)[0] == {"question": "Leo picks 11 books in the morning and 1 books in the afternoon. "
                                                       "How many books did Leo pick?", "answer": "11 + 1 = 12\n#### 12"}


def test_tool_traces_call_the_calculator_and_answer_with_its_result(tmp_path):
    from services.environments.tools import calculate, find_tool_calls

    rows = word_problems(50, seed=1)
    traces = tool_sft_rows(rows)
    assert len(traces) == 2 * len(rows)
    for row, call, answer in zip(rows, traces[::2], traces[1::2]):
        assert call["prompt"] == [{"role": "user", "content": row["question"]}]
        (tool_call,) = find_tool_calls(call["response"])  # the tools environment's default format
        result = calculate(tool_call.args)
        assert answer["prompt"] == call["prompt"] + [{"role": "assistant", "content": call["response"]},
                                                     {"role": "user", "content": f"<result>{result}</result>"}]
        assert math_verify_correct(answer["response"], reference_text(row["answer"]))  # the verifier's reading
    assert {"train", "test", "train_tools"} <= set(write_splits(tmp_path, 20, 5, seed=0))
