"""A multi-turn episode as the learner trains on it: token in, token out.

The episode is the prompt's ids followed by one response: policy turns (the token ids the
engine sampled, with its log-probs) and environment turns (an observation rendered through
the chat template and encoded once), in order. ``loss_mask`` is 1 on policy tokens and 0 on
environment tokens, so tool results and user turns are context only: never in the loss, the
KL or the entropy. Decoded text is never encoded again for training; the ids trained on are
the ids sampled.

``observation_ids`` renders an observation as the template would write the conversation: the
text after the policy turn's end-of-turn token up to the next assistant generation prompt
(with ChatML: ``\\n<|im_start|>user\\n{observation}<|im_end|>\\n<|im_start|>assistant\\n``;
after a turn cut by a stop string, the template's ``<|im_end|>`` comes first).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Turn:
    role: str  # "policy" or "environment"
    start: int  # [start, end) in the response ids
    end: int


@dataclass
class Episode:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampler's, of the policy tokens only
    turns: list[Turn] = field(default_factory=list)

    def add_policy_turn(self, ids: list[int], logprobs: list[float]) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"a policy turn of {len(ids)} tokens with {len(logprobs)} log-probs")
        self._add("policy", ids, 1)
        self.logprobs += list(logprobs)

    def add_environment_turn(self, ids: list[int]) -> None:
        self._add("environment", ids, 0)

    def _add(self, role: str, ids: list[int], mask: int) -> None:
        start = len(self.response_ids)
        self.response_ids += list(ids)
        self.loss_mask += [mask] * len(ids)
        self.turns.append(Turn(role, start, len(self.response_ids)))

    @property
    def context_ids(self) -> list[int]:
        """What the engine continues from for the next policy turn."""
        return self.prompt_ids + self.response_ids

    def policy_ids(self) -> list[int]:
        return [t for t, m in zip(self.response_ids, self.loss_mask) if m]

    def turn_ids(self, index: int) -> list[int]:
        turn = self.turns[index]
        return self.response_ids[turn.start : turn.end]


def observation_ids(tokenizer, template: str, messages: list[dict], policy_ids: list[int], observation: str,
                    role: str = "user") -> list[int]:
    """The token ids of an environment turn after a policy turn. ``messages``: the conversation
    before that policy turn (the prompt's messages and the earlier turns, as text). After a turn
    that ended with the template's end-of-turn token the ids start right after it; after one
    that stopped without it (a stop string) they start with the template's end-of-turn text,
    which is then context the policy did not sample. ValueError when the template does not
    render the conversation as a continuation of what the policy saw (it rewrites history)."""
    before = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    content = tokenizer.decode(policy_ids, skip_special_tokens=True)
    after = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": content}, {"role": role, "content": observation}],
        chat_template=template, tokenize=False, add_generation_prompt=True,
    )
    for seen in (before + tokenizer.decode(policy_ids, skip_special_tokens=False), before + content):
        if after.startswith(seen):
            return list(tokenizer(after[len(seen):], add_special_tokens=False).input_ids)
    raise ValueError("the chat template does not render the conversation as a continuation of the policy's turn "
                     f"(it rewrites earlier turns): {before[-40:] + content!r} vs {after[len(before) - 40:len(before) + len(content) + 20]!r}")
