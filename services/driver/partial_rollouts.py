"""Partial rollouts (``rollout.partial_tokens`` = C): a weight update never waits for the
longest response.

Each rollout (one job of the ``RolloutBuffer``) generates at most C tokens of every response
it works on: the n samples of the prompts drawn for it, and the unfinished responses that
earlier rollouts left. A response that stops (EOS) or reaches ``rollout.max_tokens`` is
finished; one cut at C is carried to the next rollout, which continues it after the engines
took newer weights: it is prompted with the prompt and the response so far, under a seed
fixed by (its prompt's seed, sample, length), so a resumed run continues it the same way.
Every token keeps the log-prob the engine gave it and the spans record which version sampled
which tokens (``Trajectory.version_spans``): the PPO ratio's denominator is the sampler's
log-prob token by token, which is what makes training on a mixed-version response right.

A rollout returns the prompt groups whose n responses have all finished (so a step's batch
size varies; it draws no new prompts to fill it). If none has, it runs another round on the
unfinished ones (same weights) until one has. ``Trajectory.policy_version`` stays the version
that sampled the first token, so the staleness bound counts from there: a response that would
otherwise be trained on more than ``algorithm.max_staleness`` versions after its first token
is finished in this rollout, without the cut (``_bound``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.core.batch_types import Trajectory
from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.driver.prompt_source import sample_seed
from services.rollout.worker import PromptItem
from services.rpc.trajectory_io import trajectories_by_step, write_trajectories

UNFINISHED = "partial"  # finish_reason of a response cut at partial_tokens, to be continued
PARTIAL_FILE = "partial_rollouts.pb"  # a checkpoint's unfinished responses


@dataclass
class Group:
    """A drawn prompt's n responses, from the rollout that started them (``version``) on."""

    item: PromptItem
    version: int
    samples: list[Trajectory | None]  # None until first generated

    @property
    def finished(self) -> bool:
        return all(t is not None and t.finish_reason != UNFINISHED for t in self.samples)


class PartialRollouts:
    def __init__(self, cfg: FlywheelConfig):
        r = cfg.rollout
        self.chunk, self.max_tokens, self.min_tokens, self.n = r.partial_tokens, r.max_tokens, r.min_tokens, r.n_samples
        self.bound = cfg.algorithm.max_staleness
        self.groups: list[Group] = []  # started, not finished, in the order drawn

    def generate(self, fresh: list[PromptItem], version: int,
                 generate: Callable[[list[PromptItem]], tuple[list[Trajectory], dict]]) -> tuple[list[Trajectory], dict]:
        """One rollout under ``version`` (the engines' weights now): ``fresh`` prompts' groups
        started, the unfinished ones continued; returns the finished groups' trajectories and
        ``generate``'s figures (of its last round) plus ``rollout/partial_*``."""
        self.groups += [Group(item, version, [None] * self.n) for item in fresh]
        rounds, tokens = 0, 0
        while True:
            requests, targets = self._requests(version)
            out, stats = generate(requests)
            tokens += self._merge(targets, out, version)
            rounds += 1
            ready = [g for g in self.groups if g.finished]
            if ready:
                break
        self.groups = [g for g in self.groups if not g.finished]
        trajectories = [t for g in ready for t in g.samples]
        stats.update({
            "rollout/partial_rounds": float(rounds), "rollout/partial_tokens_generated": float(tokens),
            "rollout/partial_groups_finished": float(len(ready)),
            "rollout/partial_groups_carried": float(len(self.groups)),
            "rollout/partial_continued_fraction": sum(t.version_spans is not None for t in trajectories)
            / len(trajectories),
        })
        return trajectories, stats

    def _bound(self, group: Group, version: int) -> bool:
        """Whether ``group``'s responses must finish under ``version``: the next rollout's
        weights are at least one version newer, and its responses are trained on at least one
        version after that, which would pass ``max_staleness`` counted from the first token."""
        return version - group.version >= self.bound - 1

    def _requests(self, version: int) -> tuple[list[PromptItem], list[tuple[Group, int | None]]]:
        requests, targets = [], []
        for group in self.groups:
            if group.samples[0] is None:  # fresh: its n samples from the prompt's own seed
                budget = min(self.chunk, self.max_tokens)
                requests.append(dataclasses.replace(group.item, n=self.n, max_tokens=budget,
                                                    min_tokens=min(self.min_tokens, budget)))
                targets.append((group, None))
                continue
            for k, t in enumerate(group.samples):
                if t.finish_reason != UNFINISHED:
                    continue
                left = self.max_tokens - len(t.response_ids)
                budget = left if self._bound(group, version) else min(self.chunk, left)
                requests.append(dataclasses.replace(
                    group.item, prompt_ids=t.prompt_ids + t.response_ids, n=1, max_tokens=budget,
                    min_tokens=min(max(0, self.min_tokens - len(t.response_ids)), budget),
                    seed=sample_seed(group.item.seed, k, len(t.response_ids))))
                targets.append((group, k))
        return requests, targets

    def _merge(self, targets: list[tuple[Group, int | None]], out: list[Trajectory], version: int) -> int:
        """Put ``out`` (n trajectories per fresh request, one per continuation, in request
        order) into the groups; returns the tokens generated."""
        position, tokens = 0, 0
        for group, k in targets:
            if k is None:
                for i, t in enumerate(out[position: position + self.n]):
                    group.samples[i] = self._mark(t)
                    tokens += len(t.response_ids)
                position += self.n
                continue
            prev, piece = group.samples[k], out[position]
            position += 1
            tokens += len(piece.response_ids)
            spans = list(prev.version_spans or [(0, prev.policy_version)])
            if spans[-1][1] != version:
                spans.append((len(prev.response_ids), version))
            group.samples[k] = self._mark(dataclasses.replace(
                prev, response=prev.response + piece.response, response_ids=prev.response_ids + piece.response_ids,
                logprobs=prev.logprobs + piece.logprobs, finish_reason=piece.finish_reason,
                version_spans=spans if len(spans) > 1 else None))
        if position != len(out):
            raise AssertionError(f"{len(out)} trajectories for {position} expected")
        return tokens

    def _mark(self, t: Trajectory) -> Trajectory:
        """A response cut by the piece's budget, short of max_tokens, is unfinished."""
        if t.finish_reason == "length" and len(t.response_ids) < self.max_tokens:
            t.finish_reason = UNFINISHED
        return t

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: Path) -> list[dict]:
        """The unfinished groups' responses into ``path`` (each record's step: its group's
        place); returns what else the groups need (seed, version), for the driver's state."""
        for place, group in enumerate(self.groups):
            write_trajectories(path, group.samples, [None] * len(group.samples), step=place)
        return [{"seed": g.item.seed, "version": g.version} for g in self.groups]

    def load(self, path: Path, groups: list[dict]) -> None:
        by_place = trajectories_by_step(path)
        if len(by_place) != len(groups):
            raise UserError(f"checkpoint: {path} holds {len(by_place)} unfinished groups, the state names {len(groups)}")
        self.groups = []
        for place, meta in enumerate(groups):
            samples = sorted(by_place[place], key=lambda t: t.sample_index)
            first = samples[0]
            item = PromptItem(id=first.prompt_id, prompt=first.prompt, columns=dict(first.columns), seed=meta["seed"])
            self.groups.append(Group(item, int(meta["version"]), samples))


__all__ = ["Group", "PARTIAL_FILE", "PartialRollouts", "UNFINISHED"]
