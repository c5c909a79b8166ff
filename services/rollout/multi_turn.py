"""Multi-turn episodes on one vLLM engine (``rollout.environment``).

Every episode is its own stream of engine requests: the engine is stepped
(``LLMEngine.step``), and as soon as one episode's policy turn finishes, its environment step
(tool calls: the calculator, the sandboxed Python) runs on a thread pool while the other
episodes keep generating; its next turn is then added to the engine. Episodes of different
lengths never wait for each other turn by turn. ``lock_step=True`` is the loop this replaces
(every episode's turn generated, then every environment step, then the next turn), kept for
the benchmark (tests/bench/bench_multi_turn.py).

Token in, token out: a policy turn's ids are the engine's, an environment turn is rendered
through the chat template and encoded once (``services.environments.episode``); the next
turn is prompted with exactly those ids. An episode ends when the environment says so
(finish_reason "stop"), and is truncated (finish_reason "length") when a policy turn hits
``rollout.max_tokens``, at ``max_turns`` policy turns, or when the next turn would pass
``max_total_tokens``.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from services.core.batch_types import Trajectory
from services.core.config import EnvironmentConfig
from services.core.errors import UserError
from services.environments.base import EnvironmentFailure, StepResult, checked_reset, checked_step, environment_class
from services.environments.episode import Episode, observation_ids


@dataclass(eq=False)  # one live episode is one object: compared and hashed by identity
class LiveEpisode:
    order: int  # position in the returned list
    item: Any  # PromptItem
    sample: int
    env: Any
    messages: list[dict]  # the conversation so far, as text (for rendering the next environment turn)
    episode: Episode
    turn: int = 0  # policy turns so far
    last_text: str = ""  # the last policy turn's text
    last_ids: list[int] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=lambda: {"tool_calls": 0.0, "tool_errors": 0.0, "env_s": 0.0,
                                                           "env_errors": 0.0})
    reward: float = 0.0
    finish_reason: str = "stop"
    request_keys: set[str] = field(default_factory=set)  # the engine request of its current turn


class EpisodeRunner:
    """Runs episodes of ``env_cfg``'s environment on ``llm`` (a ``vllm.LLM``)."""

    def __init__(self, llm, env_cfg: EnvironmentConfig, template: str | None):
        if template is None:
            raise UserError("rollout.environment: multi-turn episodes need a chat template (the tokenizer's own, or "
                            "model.chat_template)")
        self.llm, self.cfg, self.template = llm, env_cfg, template
        self.tokenizer = llm.get_tokenizer()
        self.env_cls = environment_class(env_cfg.name)
        self.max_model_len = llm.llm_engine.model_config.max_model_len  # prompt + every turn must fit
        self.pool = ThreadPoolExecutor(max_workers=env_cfg.concurrency, thread_name_prefix="flywheel-env")
        self.lora_request = None  # learner.lora: the adapter the worker serves now (None: the base model)

    # ------------------------------------------------------------------ episodes

    def run(self, items: list, sampling, version: int, lock_step: bool = False) -> list[Trajectory]:
        """``sampling.n`` episodes per PromptItem, in prompt order, tagged with ``version``."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        self.sampling, self.output_kind = sampling, RequestOutputKind.FINAL_ONLY
        live = [self._start(i * sampling.n + k, item, k) for i, item in enumerate(items) for k in range(sampling.n)]
        requests: dict[str, LiveEpisode] = {}
        try:
            return self._run(engine, live, requests, version, lock_step)
        except BaseException:
            # an environment failed the step: its engine requests must not linger into the next call
            for episode in set(requests.values()):
                with contextlib.suppress(Exception):
                    engine.abort_request(sorted(episode.request_keys))
            raise

    def _run(self, engine, live: list[LiveEpisode], requests: dict, version: int, lock_step: bool) -> list[Trajectory]:
        for episode in live:
            self._request(engine, episode, requests)
        env_steps: dict[Future, LiveEpisode] = {}
        waiting: list[LiveEpisode] = []  # lock step: policy turns done, their environment steps not started
        finished: list[LiveEpisode] = []
        while requests or env_steps or waiting:
            if requests:
                for out in engine.step():
                    if not out.finished:
                        continue
                    episode = requests[out.request_id]
                    for key in episode.request_keys:
                        requests.pop(key, None)
                    if not self._policy_turn(episode, out.outputs[0]):
                        finished.append(episode)
                    elif lock_step:
                        waiting.append(episode)
                    else:
                        env_steps[self.pool.submit(self._env_step, episode)] = episode
            if lock_step and not requests and waiting:  # every turn generated: now every environment step
                env_steps.update({self.pool.submit(self._env_step, e): e for e in waiting})
                waiting = []
            if not env_steps or (lock_step and requests):
                continue
            if lock_step:
                done = wait(list(env_steps)).done
            elif requests:  # the engine has work: take the environment steps that are done, then step it again
                done = [f for f in env_steps if f.done()]
            else:
                done = wait(list(env_steps), return_when=FIRST_COMPLETED).done
            for future in done:
                episode = env_steps.pop(future)
                if self._env_turn(episode, future.result()):
                    self._request(engine, episode, requests)
                else:
                    finished.append(episode)
        return [self._trajectory(e, version) for e in sorted(finished, key=lambda e: e.order)]

    def _start(self, order: int, item, sample: int) -> LiveEpisode:
        env = self._call(lambda: self.env_cls(**self.cfg.kwargs), item, "construction")
        row = {**(item.columns or {}), "prompt": item.prompt}
        messages = checked_reset(env, self.cfg.name, row, item.id)
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)
        prompt_ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        if len(prompt_ids) + self.sampling.max_tokens > self.max_model_len:
            raise EnvironmentFailure(
                f"environment {self.cfg.name!r} reset on row {item.id!r}: its first observation is {len(prompt_ids)} "
                f"tokens; with rollout.max_tokens that passes the engine's {self.max_model_len} "
                "(data.max_prompt_tokens + rollout.environment.max_total_tokens)")
        return LiveEpisode(order, item, sample, env, messages, Episode(prompt_ids))

    def _call(self, make, item, what: str):
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - the user's code: named, never swallowed
            raise EnvironmentFailure(f"environment {self.cfg.name!r} {what} for row {item.id!r} raised "
                                     f"{type(exc).__name__}: {exc}") from exc

    def _request(self, engine, episode: LiveEpisode, requests: dict) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        room = min(self.cfg.max_total_tokens - len(episode.episode.response_ids),
                   self.max_model_len - len(episode.episode.context_ids))
        seed = None if episode.item.seed is None else episode.item.seed + episode.sample + 7919 * episode.turn
        params = SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_tokens=min(s.max_tokens, room), min_tokens=min(s.min_tokens, room),
                                stop=list(s.stop) or None, logprobs=0, seed=seed, output_kind=self.output_kind)
        request_id = f"{episode.item.id}#{episode.sample}#{episode.turn}"
        returned = engine.add_request(request_id, TokensPrompt(prompt_token_ids=episode.episode.context_ids), params,
                                      lora_request=self.lora_request)
        episode.request_keys = {request_id, returned}  # the engine answers under one of them
        for key in episode.request_keys:
            requests[key] = episode

    def _policy_turn(self, episode: LiveEpisode, completion) -> bool:
        """Record a finished policy turn; whether the environment steps next."""
        ids = list(completion.token_ids)
        episode.episode.add_policy_turn(ids, [step[token].logprob for step, token in zip(completion.logprobs, ids)])
        episode.turn += 1
        episode.last_text, episode.last_ids = completion.text, ids
        if completion.finish_reason == "length":  # cut at max_tokens: no end-of-turn to continue after
            episode.finish_reason = "length"
            return False
        return True

    def _env_step(self, episode: LiveEpisode) -> StepResult | EnvironmentFailure:
        started = time.perf_counter()
        try:
            return checked_step(episode.env, self.cfg.name, episode.last_text, episode.item.id, episode.turn)
        except EnvironmentFailure as exc:
            return exc
        finally:
            episode.info["env_s"] += time.perf_counter() - started

    def _env_turn(self, episode: LiveEpisode, result: StepResult | EnvironmentFailure) -> bool:
        """Apply an environment step; whether the episode goes on with another policy turn."""
        if isinstance(result, EnvironmentFailure):
            if self.cfg.on_error == "fail":
                raise result
            episode.info["env_errors"] += 1
            episode.finish_reason = "length"
            return False
        episode.reward += result.reward or 0.0
        for key in ("tool_calls", "tool_errors"):
            episode.info[key] += float(result.info.get(key, 0) or 0)
        if result.done:
            return False
        episode.finish_reason = "length"  # unless the next turns end it
        if episode.turn >= self.cfg.max_turns:
            return False
        before = episode.messages
        ids = observation_ids(self.tokenizer, self.template, before, episode.last_ids, result.observation,
                              self.cfg.observation_role)
        after = len(episode.episode.response_ids) + len(ids)
        if after >= self.cfg.max_total_tokens or len(episode.episode.prompt_ids) + after >= self.max_model_len:
            return False  # no room for another policy turn
        episode.episode.add_environment_turn(ids)
        content = self.tokenizer.decode(episode.last_ids, skip_special_tokens=True)
        episode.messages = before + [{"role": "assistant", "content": content},
                                     {"role": self.cfg.observation_role, "content": result.observation}]
        episode.finish_reason = "stop"
        return True

    def _trajectory(self, e: LiveEpisode, version: int) -> Trajectory:
        return Trajectory(
            prompt_id=e.item.id, prompt=e.item.prompt, prompt_ids=e.episode.prompt_ids, response=e.last_text,
            response_ids=e.episode.response_ids, logprobs=e.episode.logprobs, finish_reason=e.finish_reason,
            policy_version=version, sample_index=e.sample, columns=dict(e.item.columns or {}),
            loss_mask=e.episode.loss_mask, turns=[(t.role, t.start, t.end) for t in e.episode.turns],
            env_reward=e.reward, env_info={"turns": float(e.turn), **e.info},
        )
