"""A GSM8K-format dataset of small word problems, written by this project's own generator.

Each row has ``question`` (one or two sentences and a question) and ``answer`` in GSM8K's
form: a worked solution, then ``#### N`` with the final number. One operation per problem:
addition, subtraction (never below zero) or multiplication of small numbers. ``flywheel
example`` writes train and test splits as jsonl: SFT reads question -> answer, RL prompts
with ``question`` and a ``math_verify`` scorer checks the ``answer`` column.
"""

from __future__ import annotations

import random
from pathlib import Path

from services.core.data import write_jsonl

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Noor"]
THINGS = ["apples", "pens", "books", "shells", "coins", "stamps", "cards", "cups", "eggs", "rocks"]
ADD = [
    "{n} has {a} {t}. {n} gets {b} more. How many {t} does {n} have now?",
    "{n} picks {a} {t} in the morning and {b} {t} in the afternoon. How many {t} did {n} pick?",
]
SUB = [
    "{n} has {a} {t} and gives {b} away. How many {t} does {n} have left?",
    "There are {a} {t} in a box. {n} takes out {b}. How many {t} are still in the box?",
]
MUL = [
    "{n} has {a} bags with {b} {t} in each. How many {t} does {n} have?",
]
MAX_NUMBER = 20  # `flywheel example`'s default difficulty: the largest addend


def word_problem(rng: random.Random, max_number: int = MAX_NUMBER) -> dict[str, str]:
    """Addends 1..max_number, a minuend 2..1.5 x max_number, factors 2..5."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "add", "sub", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, max_number), rng.randint(1, max_number)
        text, work, result = rng.choice(ADD), f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a = rng.randint(2, max_number * 3 // 2)
        b = rng.randint(1, a)
        text, work, result = rng.choice(SUB), f"{a} - {b} = {a - b}", a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        text, work, result = rng.choice(MUL), f"{a} * {b} = {a * b}", a * b
    question = text.format(n=name, t=thing, a=a, b=b)
    return {"question": question, "answer": f"{work}\n#### {result}"}


def word_problems(n: int, seed: int, max_number: int = MAX_NUMBER) -> list[dict[str, str]]:
    if max_number < 2:
        raise ValueError(f"max_number must be at least 2, got {max_number}")
    rng = random.Random(f"word-problems-{seed}")
    return [word_problem(rng, max_number) for _ in range(n)]


def write_splits(
    directory: str | Path, train: int, test: int, seed: int, max_number: int = MAX_NUMBER
) -> dict[str, Path]:
    """DIR/train.jsonl and DIR/test.jsonl, no test question also a train question, and
    DIR/train_tools.jsonl: the train problems as SFT traces that call the calculator."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = word_problems(train + test + test, seed, max_number)  # spare rows for the test questions that repeat
    train_rows = rows[:train]
    seen = {r["question"] for r in train_rows}
    test_rows = [r for r in rows[train:] if r["question"] not in seen][:test]
    paths = {"train": directory / "train.jsonl", "test": directory / "test.jsonl",
             "train_tools": directory / "train_tools.jsonl"}
    write_jsonl(paths["train"], train_rows)
    write_jsonl(paths["test"], test_rows)
    write_jsonl(paths["train_tools"], tool_sft_rows(train_rows))
    return paths


TOOL_CALL = "<tool>calculator</tool><args>{expression}</args>"  # the tools environment's default (xml) format


def tool_sft_rows(rows: list[dict[str, str]]) -> list[dict]:
    """SFT rows that teach the calculator tool, two per problem (each policy turn of the trace
    is one row, after the conversation before it): the question -> the call with the
    problem's expression; the question, the call and its result (a user turn, as the tools
    environment writes it) -> ``#### N``, the result (math_verify reads the last ``####``)."""
    out = []
    for row in rows:
        expression, result = row["answer"].split("\n")[0].split(" = ")
        question = [{"role": "user", "content": row["question"]}]
        call = TOOL_CALL.format(expression=expression)
        out.append({"prompt": question, "response": call})
        out.append({"prompt": question + [{"role": "assistant", "content": call},
                                          {"role": "user", "content": f"<result>{result}</result>"}],
                    "response": f"#### {result}"})
    return out
