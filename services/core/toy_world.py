"""The built-in toy world: two synthetic tasks, nothing downloaded.

**Preference task ("list")** — prompt ``list 3 fruits:``; a response is space-separated
words. The hidden gold reward is

    r_G(x, y) = (hits - 0.5 * (words - hits)) / k

where k is the requested count, ``hits`` = min(k, distinct on-topic words) and ``words``
is the number of words in y. It peaks at 1.0 for exactly k distinct words of the right
topic; off-topic words, repeats and anything past k each cost 0.5/k. The SFT corpus is
noisy and mostly *short* (fewer than k words), so in preference pairs sampled from the SFT
policy a longer response is usually the better one: length is a spurious feature that a
learned reward model can latch onto, and a policy that overoptimizes such a proxy writes
too many words and loses gold reward (Gao et al. 2023).

**Verifiable task ("arithmetic")** — prompt ``12+7=``, response ``19``; the reward is exact
match against the answer computed from the prompt.

Every task offers ``prompts(n, seed)``, ``sft_rows(n, seed)`` and
``reward(prompts, completions, **columns) -> list[float]``, the signature that the
python-function reward scorer uses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TOPICS: dict[str, list[str]] = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    "animals": ["cat", "dog", "horse", "tiger", "zebra", "rabbit", "eagle", "whale"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "tools": ["hammer", "saw", "drill", "wrench", "shovel", "chisel", "pliers", "ladder"],
    "cities": ["paris", "tokyo", "cairo", "lima", "oslo", "delhi", "rome", "sydney"],
    "sports": ["tennis", "golf", "soccer", "rugby", "hockey", "boxing", "rowing", "karate"],
}
ALL_WORDS = sorted({w for words in TOPICS.values() for w in words})
MIN_K, MAX_K = 2, 5
_LIST_PROMPT = re.compile(r"list (\d+) (\w+):")
_ARITH_PROMPT = re.compile(r"(\d+)([+-])(\d+)=")
MAX_OPERAND = 20


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    task: str


def list_gold_reward(prompt: str, completion: str) -> float:
    """Hidden gold reward of the preference task (see module docstring)."""
    match = _LIST_PROMPT.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a list-task prompt: {prompt!r}")
    k, topic = int(match.group(1)), match.group(2)
    words = completion.split()
    distinct_on_topic = {w for w in words if w in TOPICS[topic]}
    hits = min(k, len(distinct_on_topic))
    return (hits - 0.5 * (len(words) - hits)) / k


def arithmetic_answer(prompt: str) -> int:
    match = _ARITH_PROMPT.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b


def arithmetic_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion is exactly the answer (surrounding whitespace ignored)."""
    return 1.0 if completion.strip() == str(arithmetic_answer(prompt)) else 0.0


class ListTask:
    """Preference task: list k words of a topic. Gold reward is hidden from the policy."""

    name = "preference"

    def prompts(self, n: int, seed: int) -> list[PromptRow]:
        rng = random.Random(f"list-prompts-{seed}")
        topics = sorted(TOPICS)
        rows = []
        for i in range(n):
            k, topic = rng.randint(MIN_K, MAX_K), rng.choice(topics)
            rows.append(PromptRow(f"list-{seed}-{i}", f"list {k} {topic}:", self.name))
        return rows

    def sft_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        """Noisy, mostly-short demonstrations: the SFT policy is imperfect on purpose."""
        rng = random.Random(f"list-sft-{seed}")
        rows = []
        for row in self.prompts(n, seed + 10_000):
            k, topic = map(str, _LIST_PROMPT.fullmatch(row.prompt).groups())
            k_int = int(k)
            length = rng.choices(
                [rng.randint(1, k_int), k_int + 1, k_int + 2], weights=[0.8, 0.12, 0.08]
            )[0]
            words = []
            for _ in range(length):
                if rng.random() < 0.75:
                    words.append(rng.choice(TOPICS[topic]))
                else:
                    words.append(rng.choice(ALL_WORDS))
            rows.append({"prompt": row.prompt, "response": " " + " ".join(words)})
        return rows

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        return [list_gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]


class ArithmeticTask:
    """Verifiable task: small-number addition and subtraction with exact-match reward."""

    name = "arithmetic"

    def prompts(self, n: int, seed: int) -> list[PromptRow]:
        rng = random.Random(f"arith-prompts-{seed}")
        rows = []
        for i in range(n):
            a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
            op = rng.choice("+-")
            if op == "-" and b > a:
                a, b = b, a
            rows.append(PromptRow(f"arith-{seed}-{i}", f"{a}{op}{b}=", self.name))
        return rows

    def sft_rows(self, n: int, seed: int) -> list[dict[str, str]]:
        return [
            {"prompt": r.prompt, "response": str(arithmetic_answer(r.prompt))}
            for r in self.prompts(n, seed + 10_000)
        ]

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        return [arithmetic_reward(p, c) for p, c in zip(prompts, completions, strict=True)]


TASKS = {"preference": ListTask(), "arithmetic": ArithmeticTask()}


def gold_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Gold reward for any toy prompt, dispatching on the prompt's shape.

    Usable as a python-function scorer: ``services/core/toy_world.py:gold_reward``.
    """
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if _LIST_PROMPT.fullmatch(prompt.strip()):
            out.append(list_gold_reward(prompt, completion))
        else:
            out.append(arithmetic_reward(prompt, completion))
    return out


def sft_corpus(tasks: list[str], rows_per_task: int, seed: int) -> list[dict[str, str]]:
    """Shuffled prompt/response rows from the chosen toy tasks."""
    rows = [row for name in tasks for row in TASKS[name].sft_rows(rows_per_task, seed)]
    random.Random(f"corpus-{seed}").shuffle(rows)
    return rows
