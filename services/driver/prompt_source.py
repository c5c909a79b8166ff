"""PromptSource: RL prompts with stable ids, drawn through a resumable cursor.

Each epoch visits every prompt exactly once, in a permutation fixed by (seed, epoch)
(original order when shuffling is off). A batch that crosses an epoch boundary takes the
rest of the old epoch, then continues with the new epoch's permutation. ``state_dict()``
is a plain JSON-able dict; loading it makes a resumed run draw exactly what the original
run would have drawn next.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterable

from services.core.errors import UserError
from services.driver.prompt_data import toy_rows
from services.rollout.worker import PromptItem


def _as_item(raw: Any, index: int):
    """A PromptItem from a PromptItem, any object with id/prompt(/columns, prompt_ids), or a dict."""
    get = raw.get if isinstance(raw, dict) else (lambda key, default=None: getattr(raw, key, default))
    item_id, prompt, columns, prompt_ids = get("id"), get("prompt"), get("columns"), get("prompt_ids")
    if item_id is None or prompt is None:
        raise ValueError(f"prompt item {index} needs 'id' and 'prompt', got {raw!r}")
    if columns is not None and not isinstance(columns, dict):
        raise ValueError(f"prompt item {index} ({item_id!r}): columns must be a dict, got {type(columns).__name__}")
    return PromptItem(id=str(item_id), prompt=str(prompt), columns=dict(columns) if columns else None,
                      prompt_ids=list(prompt_ids) if prompt_ids is not None else None)


def sample_seed(*parts) -> int:
    """A vLLM seed fixed by ``parts`` (joined by NUL, hashed), below 2**30 so that sample k's
    seed + k stays a valid int32."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 2


def sampling_seed(run_seed: int, draw: int, prompt_id: str) -> int:
    """vLLM seed of one prompt's samples in rollout batch ``draw`` (sample k gets seed + k)."""
    return sample_seed(run_seed, draw, prompt_id)


def _fingerprint(ids: list[str]) -> str:
    digest = hashlib.sha256()
    for item_id in ids:
        digest.update(item_id.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


class PromptSource:
    """Prompts drawn ``n`` at a time, each exactly once per epoch.

    ``epoch`` counts from 0; ``position`` is how many prompts of the current epoch were
    already drawn (always < ``len(self)``: finishing an epoch moves to the next one).
    """

    def __init__(self, items: Iterable[Any], seed: int = 0, shuffle: bool = True):
        self._items = [_as_item(raw, i) for i, raw in enumerate(items)]
        if not self._items:
            raise ValueError("PromptSource needs at least one prompt")
        ids = [item.id for item in self._items]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"prompt ids must be unique; repeated: {', '.join(dupes)}")
        self._fingerprint = _fingerprint(ids)
        self._seed = int(seed)
        self._shuffle = bool(shuffle)
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def items(self) -> list:
        """All prompts in their original order."""
        return list(self._items)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self._items)))
        if self._shuffle:
            # a string seed hashes deterministically (sha512) across runs and Python versions
            random.Random(f"prompt-source-{self._seed}-{epoch}").shuffle(order)
        return order

    def epoch_order(self, epoch: int) -> list[str]:
        """Prompt ids in the order epoch ``epoch`` draws them."""
        return [self._items[i].id for i in self._permutation(epoch)]

    def next_batch(self, n: int) -> list:
        """The next ``n`` prompts (PromptItem), crossing epoch boundaries as needed."""
        if n < 0:
            raise ValueError(f"next_batch needs n >= 0, got {n}")
        out = []
        while len(out) < n:
            take = min(n - len(out), len(self._items) - self._position)
            out.extend(self._items[i] for i in self._order[self._position : self._position + take])
            self._position += take
            if self._position == len(self._items):
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
        return out

    def state_dict(self) -> dict:
        """Plain JSON-able cursor state."""
        return {
            "epoch": self._epoch, "position": self._position, "seed": self._seed,
            "shuffle": self._shuffle, "size": len(self._items), "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; its seed and shuffle flag replace this source's, so the
        run draws what the saved run would have. The prompt set must be the same."""
        missing = {"epoch", "position", "seed", "shuffle", "size", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"prompt source state lacks {', '.join(sorted(missing))}")
        if state["size"] != len(self._items) or state["fingerprint"] != self._fingerprint:
            raise UserError(
                f"cannot resume the prompt cursor: the checkpoint was taken over {state['size']} prompts "
                f"(fingerprint {state['fingerprint']}), this run has {len(self._items)} "
                f"(fingerprint {self._fingerprint}); the data config changed since the checkpoint"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self._items):
            raise ValueError(f"prompt source state out of range: epoch={epoch}, position={position}")
        self._seed, self._shuffle = int(state["seed"]), bool(state["shuffle"])
        self._epoch, self._position = epoch, position
        self._order = self._permutation(epoch)


def toy_prompt_source(cfg) -> PromptSource:
    """The toy world's prompts (``prompt_data.toy_rows``), as text: the engine tokenizes them."""
    if cfg.data.source != "toy":
        raise UserError(f"data.source: toy_prompt_source serves the toy world only, got {cfg.data.source!r}")
    return PromptSource(toy_rows(cfg), seed=cfg.seed, shuffle=cfg.data.shuffle)
