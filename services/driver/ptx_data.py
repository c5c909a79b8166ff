"""SFT rows for the PPO-ptx term (``algorithm.ptx_coef``, Ouyang et al. 2022).

``data.ptx_source``: ``toy`` (the toy world's SFT demonstrations) or a jsonl / parquet /
``datasets`` source with ``data.prompt_key`` / ``data.response_key`` columns. Each RL step
takes the next ``algorithm.ptx_batch_size`` rows of a seeded shuffle (reshuffled every pass),
encoded as in SFT (chat template when the tokenizer has one; loss on response tokens only).
"""

from __future__ import annotations

import random

from services.core.batch_types import TokenBatch
from services.core.config import FlywheelConfig
from services.core.special_tokens import pad_token_id
from services.learner.sft_data import IGNORE, collate, encode_example, sft_rows


class PtxBatches:
    def __init__(self, cfg: FlywheelConfig, tokenizer):
        data = cfg.data.model_copy(update={"source": cfg.data.ptx_source})
        rows = sft_rows(cfg.model_copy(update={"data": data}))
        self.examples = [
            encode_example(tokenizer, r["prompt"], r["response"], data.max_prompt_tokens, data.max_response_tokens,
                           chat_template=cfg.model.chat_template, system_prompt=data.system_prompt)
            for r in rows
        ]
        self.pad_id = pad_token_id(tokenizer)
        self.batch_size = cfg.algorithm.ptx_batch_size
        self._rng = random.Random(f"ptx-{cfg.seed}")
        self._order: list[int] = []

    def next_indices(self) -> list[int]:
        """Indices of the next ``batch_size`` examples (a fresh seeded shuffle each pass)."""
        picked = []
        while len(picked) < self.batch_size:
            if not self._order:
                self._order = list(range(len(self.examples)))
                self._rng.shuffle(self._order)
            picked.append(self._order.pop())
        return picked

    def next_batch(self) -> TokenBatch:
        picked = [self.examples[i] for i in self.next_indices()]
        input_ids, attention, labels = collate(picked, self.pad_id)
        return TokenBatch(input_ids, attention, (labels != IGNORE).long())

    def state_dict(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])


__all__ = ["PtxBatches"]
