"""In-process fakes of the four services the driver talks to (the protocols in
``services/driver/wiring.py``), so that the driver's own loop (streaming, the staleness
bound, checkpoints and resume, the metrics contract) is tested in seconds without Ray, vLLM
or DeepSpeed. They are deterministic: a resumed run sees what the original saw.

The fake policy gives token t under version v the log-prob ``token_logprob(t, v)``; the
fake rollout samples with the version it holds, so the driver's train-inference gap is 0
exactly when it synced the engine to the learner's version (and not otherwise).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from services.core import toy_world
from services.core.batch_types import TokenBatch, Trajectory
from services.core.errors import UserError
from services.driver.wiring import Services
from services.reward.aggregate import aggregate_scores

WORDS = ["apple", "pear", "fig", "plum", "kiwi", "lime", "red", "blue", "green", "dog", "cat", "car"]


def token_logprob(token: int, version: int) -> float:
    return -0.1 * (1 + token % 5) - 0.01 * version


def fake_policy_dir(root: Path) -> Path:
    """A policy directory with the files the driver reads and copies (config, tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "fake", "vocab_size": 64, "hidden_size": 4}))
    (root / "tokenizer_config.json").write_text("{}")
    return root


class FakeService:
    def count_quiet_restarts(self) -> int:
        return 0

    def metrics_texts(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        self.shut_down = True


class FakeLearner(FakeService):
    def __init__(self):
        self.policy_version = 0
        self.trained: list = []  # (policy version before the step, batch) per train step
        self.logprob_calls = 0

    def logprobs(self, tokens: TokenBatch) -> torch.Tensor:
        self.logprob_calls += 1
        lp = -0.1 * (1 + tokens.input_ids % 5).float() - 0.01 * self.policy_version
        valid = tokens.attention_mask.bool().clone()
        valid[:, 0] = False
        return torch.where(valid, lp, torch.zeros(()))

    def values(self, tokens: TokenBatch) -> torch.Tensor:
        return torch.zeros(tokens.input_ids.shape)

    def response_hidden_sums(self, tokens: TokenBatch) -> torch.Tensor:
        ids = (tokens.input_ids * tokens.response_mask.long()).float()
        return torch.stack([ids.sum(-1), (ids % 3).sum(-1), (ids % 5).sum(-1), ids.max(-1).values], dim=-1)

    def train_step(self, batch, spec) -> dict[str, float]:
        self.trained.append((self.policy_version, batch))
        self.policy_version += 1
        return {"train/loss": float(batch.size), "train/pg_loss": 0.0, "policy_version": self.policy_version}

    def export_weights(self) -> dict[str, torch.Tensor]:
        return {"version": torch.tensor([float(self.policy_version)])}

    def publish_weights(self) -> dict[str, torch.Tensor]:
        return self.export_weights()

    def save_checkpoint(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "fake_learner.json").write_text(json.dumps({"policy_version": self.policy_version}))

    def load_checkpoint(self, directory: str) -> int:
        path = Path(directory) / "fake_learner.json"
        if not path.is_file():
            raise UserError(f"checkpoint: no learner checkpoint in '{directory}'")
        self.policy_version = json.loads(path.read_text())["policy_version"]
        return self.policy_version


class FakeRollout(FakeService):
    """``rollout.n_samples`` responses of 1-4 words per prompt, drawn from the prompt's seed.
    ``stale_groups``: that many prompt groups of each batch come back labelled one version
    older (as if generated before the last sync), to exercise the staleness filter."""

    max_words = 4  # a response has 1 .. max_words words (a subclass may draw longer ones)

    def __init__(self, n_samples: int, stale_groups: int = 0):
        self.version, self.n, self.stale_groups = 0, n_samples, stale_groups
        self.synced: list[int] = []  # versions pushed, in order
        self.generated: list[list[Trajectory]] = []  # every batch, as returned
        self.evaluated: list[list[Trajectory]] = []  # every held-out evaluation's samples
        self.actors, self.joining = ["worker-0"], []  # the elastic pool's size (RolloutScaler)
        self.resized: list[int] = []  # every size asked for, in order

    @property
    def target_size(self) -> int:
        return len(self.actors)

    def resize(self, count: int) -> None:
        """Takes effect at once (a real pool's new workers join once ready)."""
        self.resized.append(count)
        self.actors = [f"worker-{i}" for i in range(count)]

    def admit_joined(self) -> list[str]:
        return []

    def generate_with_stats(self, prompts: list, sampling=None) -> tuple[list[Trajectory], dict[str, float]]:
        """``sampling`` (the held-out evaluation's): its ``n`` samples, kept apart in ``evaluated``."""
        out = []
        n = sampling.n if sampling is not None else self.n
        for g, item in enumerate(prompts):
            stale = sampling is None and g < self.stale_groups and self.version > 0
            version = self.version - 1 if stale else self.version
            prompt_ids = item.prompt_ids or [2 + ord(c) % 40 for c in item.prompt[:6]] or [2]
            for k in range(n if item.n is None else item.n):  # a prompt's own bounds: a partial rollout's pieces
                rng = random.Random(item.seed + k)
                words = [rng.randrange(len(WORDS)) for _ in range(rng.randint(1, self.max_words))]
                cut = item.max_tokens is not None and len(words) > item.max_tokens
                words = words[: item.max_tokens] if cut else words
                ids = [10 + w for w in words]
                out.append(Trajectory(
                    prompt_id=item.id, prompt=item.prompt, prompt_ids=prompt_ids,
                    response="".join(" " + WORDS[w] for w in words)[0 if item.prompt_ids else 1:], response_ids=ids,
                    logprobs=[token_logprob(t, version) for t in ids], finish_reason="length" if cut else "stop",
                    policy_version=version, sample_index=k, columns=dict(item.columns or {}),
                ))
        (self.generated if sampling is None else self.evaluated).append(out)
        return out, {"rollout/requeued_prompts": 0.0, "rollout/workers": float(len(self.actors)),
                     "rollout/worker_version_min": float(self.version),
                     "rollout/worker_version_max": float(self.version)}

    def sync_weights(self, weights: dict, version: int) -> dict[str, float]:
        assert float(weights["version"]) == version, (weights, version)  # the learner's export of that version
        self.version = version
        self.synced.append(version)
        return {"sync/seconds": 0.0}


class FakePending:
    def __init__(self, scores):
        self.scores = scores

    def result(self):
        return self.scores


class FakeReward(FakeService):
    """Two members: the toy gold reward, and the gold reward minus 0.1 per word (so the
    ensemble has spread)."""

    def submit(self, prompts, completions, columns=None) -> FakePending:
        gold = toy_world.gold_reward(list(prompts), list(completions))
        short = [g - 0.1 * len(c.split()) for g, c in zip(gold, completions)]
        return FakePending(aggregate_scores([gold, short], ["gold", "short"], "mean", 0.0))


class FakeReference(FakeService):
    def logprobs(self, prompt_ids, response_ids) -> list[list[float]]:
        return [[token_logprob(t, 0) - 0.05 for t in row] for row in response_ids]


def fake_services(stale_groups: int = 0, learner_class: type = FakeLearner, rollout_class: type = FakeRollout):
    """A ``make_services`` for ``Driver.build``; the made Services is kept as ``.made``."""

    def make(cfg, policy_dir, needs_critic, optimizer_steps) -> Services:
        learner, rollout = learner_class(), rollout_class(cfg.rollout.n_samples, stale_groups)
        services = Services(learner, FakeReference(), FakeReward(), rollout, pad_id=0)
        services.started = [learner, services.reference, services.reward, rollout]
        make.made = services
        return services

    return make
