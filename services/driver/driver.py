"""The driver: builds the services from config and streams on-policy batches through them.

One step: prompts -> rollout -> (reward ensemble | reference log-probs | critic values, run
concurrently) -> advantages or DPO pairs (pure functions) -> learner update -> weight sync.
With ``algorithm.max_staleness`` = k >= 1 the rollouts of the next k batches run while the
learner trains on this one (``rollout_buffer.RolloutBuffer``); every trajectory carries the
policy version that produced it and one older than the bound is dropped, never trained on.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from statistics import mean, pstdev

from services.algorithms import batches as alg
from services.algorithms.base import StepInputs, get_algorithm
from services.core.actor_group import takes_all_cores
from services.core.batch_types import Trajectory, pad_response_values, trajectory_columns
from services.core.config import FlywheelConfig
from services.core.config_loading import dump_config
from services.core.errors import RunStopped, ServiceFailure, UserError
from services.core.learner_batches import PairBatch
from services.core.metrics import MetricsWriter
from services.driver.checkpoint import (
    PENDING_FILE, CheckpointStore, copy_policy_files, model_fingerprint, read_pending, stopped_hint, trim_metrics,
    write_pending, write_policy,
)
from services.driver.dynamic_sampling import filled_rollout
from services.driver.diagnostics import (
    LikelihoodDisplacementMonitor, LogprobGapMonitor, episode_stats, learner_old_due, probe_due, step_shares,
)
from services.driver.exporter import MetricsExporter, RunMetrics
from services.driver.held_out_eval import HeldOutEval
from services.driver.preflight import check_resume, check_rl_settings, optimizer_steps_per_step
from services.driver.partial_rollouts import PARTIAL_FILE, PartialRollouts
from services.driver.prompt_selection import VarianceSelectedPrompts
from services.driver.prompt_source import PromptSource, sampling_seed, toy_prompt_source
from services.driver.ptx_data import PtxBatches
from services.driver.report import write_report
from services.driver.rollout_buffer import RolloutBuffer, load_weights
from services.driver.rollout_scaling import RolloutScaler
from services.driver.step_record import batch_figures, restart_figures
from services.driver.stop_signals import StopSignals
from services.driver.wiring import Services, build_services
from services.learner.losses import LossSpec
from services.reward.aggregate import EnsembleScores, soft_overlong_penalty
from services.reward.preference import PreferenceModel
from services.reward.process_steps import step_reward_rows
from services.reward.stats import variance_by_prompt, variance_record
from services.rpc.trajectory_io import trim_trajectories, write_trajectories


class Driver:
    def __init__(self, cfg: FlywheelConfig, out_dir: str | Path, policy_dir: str | Path, prompts: list | None = None,
                 eval_prompts: list | None = None):
        """``prompts``, ``eval_prompts``: the run's RL and held-out prompts (``prompt_data.rl_prompts``,
        what `flywheel train` passes); None draws the toy world's, unrendered (the in-process
        tests), and evaluates on none."""
        self.cfg, self.out, self.policy_dir = cfg, Path(out_dir), str(policy_dir)
        self.algorithm = cfg.algorithm.name
        self.algo = get_algorithm(self.algorithm)
        self.displacement = LikelihoodDisplacementMonitor(cfg.algorithm.displacement_patience)
        self.logprob_gap = LogprobGapMonitor(cfg.rollout.gap_alarm(cfg.model.dtype))
        check_rl_settings(cfg)  # also run by `flywheel train` before the toy policy's SFT
        self.prompts: PromptSource = (
            toy_prompt_source(cfg) if prompts is None else PromptSource(prompts, seed=cfg.seed, shuffle=cfg.data.shuffle)
        )
        if cfg.data.selection == "reward_variance":
            self.prompts = VarianceSelectedPrompts(
                self.prompts.items, seed=cfg.seed, shuffle=cfg.data.shuffle, floor=cfg.data.selection_floor
            )
        self.held_out = HeldOutEval(cfg, eval_prompts) if eval_prompts else None
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flywheel-driver")
        self.services: list = []
        self.placement_group = None
        self.draws = 0  # rollout batches drawn so far: with the run seed it fixes the sampling seeds
        self.buffer: RolloutBuffer | None = None  # streaming runs' queued rollouts
        self.start_step = 0  # the step a resumed run continues after
        self.stop = StopSignals()
        self.partial = PartialRollouts(cfg) if cfg.rollout.partial_tokens else None

    # ------------------------------------------------------------------ building

    def build(self, make_services: Callable[..., Services] = build_services) -> None:
        """Start the services (``wiring.build_services``: real Ray actors; tests pass in-process
        fakes with the same signature)."""

        cfg = self.cfg
        services = make_services(cfg, self.policy_dir, self.algo.needs_critic,
                                 cfg.algorithm.total_steps * optimizer_steps_per_step(cfg))
        self.learner, self.reference, self.reward, self.rollout = (
            services.learner, services.reference, services.reward, services.rollout
        )
        self.pad_id, self.placement_group, self.services = services.pad_id, services.placement_group, services.started
        self.restarts()  # the process ids every later count compares against
        self.scaler = RolloutScaler(self.rollout, cfg, self.out)
        self.spec = LossSpec.from_config(cfg, self.algo.loss_kind, self.algo.policy_loss)
        self.ptx, self.tokenizer = None, services.tokenizer
        self.preference = (PreferenceModel(cfg.reward.preference, remote=self.reward.compare)
                           if self.algo.needs_preference else None)
        if self.spec.algorithm.ptx_coef:
            self.ptx = PtxBatches(cfg, services.tokenizer)

    def metrics_texts(self) -> list[str]:
        return [text for service in self.services for text in service.metrics_texts()]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.buffer is not None:
            self.buffer.close()
        for service in reversed(self.services):
            service.shutdown()
        self.services = []
        if self.placement_group is not None:
            import ray

            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None

    # ------------------------------------------------------------------ one step

    def _rollout(self, prompts: int | None = None) -> tuple[list[Trajectory], float, dict]:
        """The next ``prompts`` (default ``rollout.prompts_per_step``) prompts' trajectories, the
        rollout time and the pool's figures (prompts generated again after a worker died, the
        versions the workers hold afterwards)."""
        return self._generate(self._draw(prompts))

    def _draw(self, prompts: int | None = None) -> list:
        """The next ``prompts`` (default ``rollout.prompts_per_step``) prompts, each with the
        sampling seed of this draw."""
        self.draws += 1
        return [
            dataclasses.replace(item, seed=sampling_seed(self.cfg.seed, self.draws, item.id))
            for item in self.prompts.next_batch(prompts or self.cfg.rollout.prompts_per_step)
        ]

    def _generate(self, batch: list) -> tuple[list[Trajectory], float, dict]:
        """``batch``'s trajectories (with partial rollouts: the prompt groups that finished)."""
        started = time.perf_counter()
        if self.partial is not None:
            trajectories, stats = self.partial.generate(batch, self.rollout.version, self.rollout.generate_with_stats)
        else:
            trajectories, stats = self.rollout.generate_with_stats(batch)
        return trajectories, time.perf_counter() - started, stats

    def _rollout_filled(self) -> tuple[list[Trajectory], float, dict, tuple[EnsembleScores, dict]]:
        """``algorithm.dynamic_sampling`` (DAPO): ``dynamic_sampling.filled_rollout``."""
        return filled_rollout(self._rollout, self._rewards, self.cfg.rollout.prompts_per_step,
                              self.cfg.algorithm.max_refills)

    def _rewards(self, trajectories: list[Trajectory]) -> tuple[EnsembleScores, list[float]]:
        """The reward ensemble's scores of ``trajectories`` and the rewards trained on; a
        reward-variance selector sees them all (a tied group that is dropped counts as seen)."""
        ensemble = self._submit_rewards(trajectories).result()
        rewards, _ = self._trained_rewards(ensemble.scores, trajectories)
        if isinstance(self.prompts, VarianceSelectedPrompts):
            self.prompts.observe(variance_by_prompt([t.prompt_id for t in trajectories], rewards))
        return ensemble, rewards

    def _submit_rewards(self, trajectories: list[Trajectory]):
        """The reward ensemble's scoring of ``trajectories``, sent (``.result()`` waits)."""
        return self.reward.submit([t.prompt for t in trajectories], [t.response for t in trajectories],
                                  trajectory_columns(trajectories))

    def _trained_rewards(self, scores: list[float], kept: list[Trajectory]) -> tuple[list[float], dict]:
        """The rewards trained on: the ensemble's aggregate ``scores``, plus a multi-turn
        episode's environment rewards and DAPO's soft overlong penalty; and their metrics."""
        record: dict = {}
        if self.cfg.rollout.environment is not None:  # multi-turn: the environment's own rewards count too
            scores = [s + t.env_reward for s, t in zip(scores, kept)]
            record.update(episode_stats(kept))
        r = self.cfg.reward
        if r.overlong_buffer:  # DAPO's soft overlong penalty on every trained-on reward
            penalties = [soft_overlong_penalty(len(t.response_ids), self.cfg.rollout.max_tokens, r.overlong_buffer,
                                               r.overlong_factor) for t in kept]
            scores = [s + p for s, p in zip(scores, penalties)]
            record["reward/overlong_penalty_mean"] = mean(penalties)
        return scores, record

    def _sync(self) -> dict[str, float]:
        """Sync the engines to the learner's version (``load_weights``'s figures)."""
        version = self.learner.policy_version
        weights = self.learner.publish_weights() if self.rollout.version != version else None
        return load_weights(self.rollout, weights, version)

    def _score(self, trajectories: list[Trajectory], learner_old: bool, ensemble: EnsembleScores | None = None):
        """Reward ensemble (unless its ``ensemble`` scores are given), reference log-probs and
        (PPO) critic values, concurrently; the learner's forward passes after the reference's
        where either takes every CPU core. Also returns timing/reward_s and
        timing/reference_s, each from the start of scoring."""
        started, timing = time.perf_counter(), {}
        if ensemble is None:
            reward_future = self.executor.submit(self._submit_rewards(trajectories).result)
            reward_future.add_done_callback(
                lambda _: timing.setdefault("timing/reward_s", time.perf_counter() - started))
        else:
            reward_future = done_future(ensemble)
        tokens = alg.build_tokens(trajectories, self.pad_id)
        ref_future = self.executor.submit(
            self.reference.logprobs, [t.prompt_ids for t in trajectories], [t.response_ids for t in trajectories]
        )
        ref_future.add_done_callback(lambda _: timing.setdefault("timing/reference_s", time.perf_counter() - started))
        if takes_all_cores(self.cfg.learner.resources) or takes_all_cores(self.cfg.reference.resources):
            ref_future.result()  # CPU threads on every core each: side by side they only slow each other down
        values_future: Future | None = None
        if self.algo.needs_critic:
            values_future = self.executor.submit(self.learner.values, tokens)
        old_future: Future | None = None
        if learner_old:
            old_future = self.executor.submit(self.learner.logprobs, tokens)
        scores = reward_future.result()
        ref = pad_response_values(alg.policy_token_values(ref_future.result(), trajectories), tokens)
        values = values_future.result() if values_future else None
        sampler = alg.sampler_logprobs(trajectories, tokens)
        # strictly on-policy: the learner's own log-probs (where learner_old_due); off-policy: the
        # sampler's, so the PPO ratio corrects for the staler policy that produced the samples
        old = old_future.result() if old_future else sampler
        return scores, tokens, ref, values, sampler, old, timing

    def _step_rewards(self, kept: list[Trajectory], ensemble: EnsembleScores, scores: list[float], tokens):
        """``algorithm.step_rewards``: the process member's step scores (times its weight) on
        the tokens that end the steps, the rewards it did not give (``scores`` - its aggregate)
        on the last, [B, T]."""
        member = self.cfg.reward.scorers[0]
        rows = step_reward_rows(
            [t.response for t in kept], [t.response_ids for t in kept],
            [[member.weight * v for v in row] for row in ensemble.member_steps[ensemble.member_names[0]]],
            [s - a for s, a in zip(scores, ensemble.scores)], member.step_delimiter,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        return pad_response_values(rows, tokens)

    def _probe_gap(self, step: int, trajectories: list[Trajectory]) -> dict:
        """Streaming runs: the gap on a batch sampled by the learner's current version (before
        the learner moves on), with one extra learner forward."""
        same = [t for t in trajectories if t.policy_version == self.learner.policy_version]
        if not same:
            return {}
        tokens = alg.build_tokens(same, self.pad_id)
        return self.logprob_gap.update(step, same[0].policy_version, self.learner.logprobs(tokens),
                                       alg.sampler_logprobs(same, tokens), tokens.response_mask)

    def _reward_variance(self, trajectories: list[Trajectory], scores: list[float]) -> dict:
        """Per-prompt reward variance over the n samples (Razin et al.); feeds the selector."""
        variances = variance_by_prompt([t.prompt_id for t in trajectories], scores)
        selection = {}
        if isinstance(self.prompts, VarianceSelectedPrompts):
            self.prompts.observe(variances)
            selection = {"data/prompts_seen": float(self.prompts.prompts_drawn)}
        return {**selection, **variance_record(variances, self.cfg.reward.variance.threshold)}

    def _chosen_logps(self, batch: PairBatch):
        """Summed log p(chosen response) [B] under the learner now."""
        tokens = batch.chosen
        return (self.learner.logprobs(tokens) * tokens.response_mask).sum(dim=1)

    def restarts(self) -> dict[str, int]:
        """Actor restarts so far, per service (rollout workers, reward members, reference
        replicas), those Ray made while an actor was idle included."""
        return {"rollout": self.rollout.count_quiet_restarts(), "reward": self.reward.count_quiet_restarts(),
                "reference": self.reference.count_quiet_restarts()}

    def step(self, step: int, trajectories: list[Trajectory], rollout_s: float,
             prescored: tuple[EnsembleScores, dict] | None = None) -> dict:
        """One update on ``trajectories``; ``prescored``: their ensemble scores and the
        dynamic-sampling figures (``_rollout_filled``)."""
        started = time.perf_counter()
        learner_version = self.learner.policy_version
        kept, dropped = alg.filter_stale(trajectories, learner_version, self.cfg.algorithm.max_staleness)
        if self.algo.group_relative:  # keep whole prompt groups
            kept = alg.complete_groups(kept, self.cfg.rollout.n_samples)
        record: dict = {"step": step, "rollout/trajectories": len(trajectories), "rollout/dropped_stale": dropped,
                        **(prescored[1] if prescored else {})}
        if not kept:
            return record
        score_started = time.perf_counter()
        learner_old = learner_old_due(self.cfg, step)
        if prescored is not None and len(prescored[0].scores) != len(kept):
            raise AssertionError(f"{len(prescored[0].scores)} scores for {len(kept)} trajectories")
        ensemble, tokens, ref, values, sampler, old, timing = self._score(
            kept, learner_old, prescored[0] if prescored else None)
        scores, reward_record = self._trained_rewards(ensemble.scores, kept)
        record.update(reward_record)
        record["timing/score_s"] = time.perf_counter() - score_started
        record.update(timing)
        if learner_old and not self.cfg.algorithm.max_staleness:  # old: the learner's, under the version that sampled
            record.update(self.logprob_gap.update(step, learner_version, old, sampler, tokens.response_mask))
        steps = self._step_rewards(kept, ensemble, scores, tokens) if self.cfg.algorithm.step_rewards else None
        batch, stats = self.algo.make_batch(
            StepInputs(kept, scores, tokens, ref, old, sampler, values, self.pad_id, self.cfg, self.learner, steps,
                       self.preference)
        )
        record.update(stats)
        if prescored is not None:
            record.update(prescored[1])
        staleness = [learner_version - t.policy_version for t in kept]
        assert max(staleness) <= self.cfg.algorithm.max_staleness, staleness  # never train on stale data
        train_started = time.perf_counter()
        track_displacement = self.algo.tracks_displacement and batch is not None
        before = self._chosen_logps(batch) if track_displacement else None
        if batch is not None and self.ptx is not None:
            batch = dataclasses.replace(batch, ptx=self.ptx.next_batch())
        train_metrics = self.learner.train_step(batch, self.spec) if batch is not None else {}
        if track_displacement:
            delta = float((self._chosen_logps(batch) - before).mean())
            record.update(self.displacement.update(step, delta))
        record["timing/train_s"] = time.perf_counter() - train_started
        record.update(train_metrics)
        record.update(ensemble.summary())
        record["reward/mean"] = mean(scores)  # what was trained on: the aggregate plus any overlong penalty
        if self.cfg.metrics.dump_rollouts:
            write_trajectories(
                self.out / "rollouts.pb", kept, scores,
                dict(zip(ensemble.member_names, ensemble.member_scores)), step=step,
            )
        record.update(alg.kl_stats(sampler, ref, tokens, self.cfg.algorithm.kl_estimator))
        record.setdefault("train/kl", record["rollout/kl"])
        record["reward/std"] = pstdev(scores) if len(scores) > 1 else 0.0
        record.update(self._reward_variance(kept, scores))
        record.update(batch_figures(kept, trajectories, staleness, self.cfg.data.source == "toy", rollout_s,
                                    record["timing/train_s"]))
        record["timing/rollout_s"] = rollout_s
        record["timing/learn_s"] = time.perf_counter() - started
        return record

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool = True, resume: Path | None = None, stop_after: int | None = None) -> list[dict]:
        """Steps ``start_step + 1 .. total_steps``; a checkpoint every ``checkpoint.every_steps``,
        at the end, on SIGTERM (then ``RunStopped``) and after ``stop_after`` steps of this call."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        pending = self.resume(resume) if resume is not None else []  # refuses a mismatched checkpoint first
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        run_metrics = RunMetrics()
        exporter = None
        if self.cfg.metrics.prometheus_port is not None:
            m = self.cfg.metrics
            exporter = MetricsExporter(m.prometheus_port, self.metrics_texts, host=m.prometheus_host,
                                       registry=run_metrics.registry)
            print(f"Prometheus metrics at {exporter.url}")
        records = []
        stream = self.cfg.algorithm.max_staleness >= 1
        total, every = self.cfg.algorithm.total_steps, self.cfg.checkpoint.every_steps
        last = total if stop_after is None else min(total, self.start_step + stop_after)
        restore_signal = self.stop.catch()
        restarts_logged: dict[str, int] = {}
        completed = self.start_step  # the last step in metrics.jsonl
        try:
            with MetricsWriter(self.out / "metrics.jsonl", append=resume is not None) as writer, tqdm(
                total=total, initial=self.start_step, desc=self.algorithm, unit="step", disable=not progress
            ) as bar:
                if self.held_out is not None and self.start_step == 0 and self.cfg.eval.before_training:
                    baseline = {"step": 0, "policy_version": self.learner.policy_version, **self._evaluate()}
                    writer.write(baseline)  # the policy before RL: what the later evaluations compare with
                    run_metrics.update(baseline)
                # batches queued beyond the one trained on; with partial rollouts one, the responses carried
                # from one rollout to the next take up the rest of the staleness bound
                ahead = 1 if self.partial is not None else self.cfg.algorithm.max_staleness
                if stream:
                    self._start_buffer(pending, min(total, self.start_step + ahead))
                for step in range(self.start_step + 1, last + 1):
                    step_started = time.perf_counter()
                    sync: dict = {}  # on-policy: the sync before this step's rollout (streaming: in its figures)
                    gap: dict = {}
                    if stream:
                        trajectories, rollout_s, rollout_stats = self.buffer.take()
                        prescored, scaled = None, {}
                        rollout_wait_s = time.perf_counter() - step_started  # the part not hidden behind training
                        if step + ahead <= total:
                            self.buffer.queue_next(records[-1] if records else None)
                        if self.buffer and probe_due(self.cfg, step):
                            gap = self._probe_gap(step, self.buffer.newest()[0])
                    else:
                        sync = self._sync()
                        scaled = self.scaler.update(records[-1] if records else None)
                        trajectories, rollout_s, rollout_stats, prescored = (
                            self._rollout_filled() if self.cfg.algorithm.dynamic_sampling else (*self._rollout(), None))
                    record = self.step(step, trajectories, rollout_s, prescored)
                    if self.held_out is not None and self.held_out.due(step):
                        record.update(self._evaluate())
                    record.update(gap)
                    record.update({"timing/sync_s": 0.0, "sync/bytes": 0.0, **rollout_stats, **scaled, **sync})
                    own = rollout_stats.get("rollout/partial_tokens_generated")  # a partial rollout's own tokens
                    if rollout_s > 0 and own is not None:
                        record["perf/generated_tokens_per_s"] = own / rollout_s
                    record["policy_version"] = self.learner.policy_version
                    record["timing/step_s"] = time.perf_counter() - step_started
                    if stream:
                        record["timing/rollout_wait_s"] = rollout_wait_s
                    record.update(step_shares(record, streaming=stream))
                    restarts = self.restarts()
                    record.update(restart_figures(restarts, restarts_logged))
                    restarts_logged = restarts
                    writer.write(record)
                    run_metrics.update(record)
                    records.append(record)
                    completed = step
                    shown = {"reward": "reward/mean", "gold": "gold/mean"}  # gold: the toy world only
                    bar.set_postfix({k: f"{record[v]:.3f}" for k, v in shown.items() if v in record}, refresh=False)
                    bar.update(1)
                    stopping = self.stop.name is not None or step == last
                    if stopping or (every and step % every == 0):
                        path = self.save_checkpoint(step, self.buffer.pending() if stream else [])
                        bar.write(f"checkpoint: {path}")
                    if self.stop.name is not None:
                        raise RunStopped(
                            f"stopped by {self.stop.name} after step {step}; continue with "
                            f"`flywheel train ... --out {self.out} --resume`", 128 + signal.Signals[self.stop.name],
                        )
            if last == total:
                self.save_policy()
            else:
                print(f"stopped after step {last} of {total} (--stop-after); continue with --resume")
        except ServiceFailure as exc:
            raise ServiceFailure(f"{exc}\n{stopped_hint(self.out, completed)}") from None
        finally:
            restore_signal()
            if self.buffer is not None:
                self.buffer.close()
                self.buffer = None
            if exporter is not None:
                exporter.close()
        report = write_report(self.out)
        print(f"report: {report}")
        return records

    def _start_buffer(self, pending: list, queued_through: int) -> None:
        """Streaming: the buffer, with a resumed run's saved batches first, then the rollouts of
        the steps after them through ``queued_through``, by the weights the engines hold."""
        self.buffer = RolloutBuffer(self.learner, self.rollout, self.scaler, self._draw, self._generate)
        self.buffer.start(pending, queued_through - self.start_step - len(pending))

    def _evaluate(self) -> dict:
        """The held-out evaluation of the weights the learner has now: the engines take them
        first (in a streaming run after the rollouts queued ahead, as a sync needs idle engines;
        the next queued rollout's sync is then a no-op, so the run trains on what it would
        without it)."""
        started = time.perf_counter()
        if self.buffer is None:
            self._sync()
            record = self.held_out.run(self.rollout, self.reward)
        else:
            record = self.buffer.run(lambda: self.held_out.run(self.rollout, self.reward))
        record["timing/eval_s"] = time.perf_counter() - started
        return record

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything of the driver's own that the next step depends on (JSON-able)."""
        state = {
            "policy_version": self.learner.policy_version, "draws": self.draws,
            "prompts": self.prompts.state_dict(), "displacement_streak": self.displacement.streak,
            "algorithm": self.algorithm, "model_fingerprint": model_fingerprint(self.policy_dir),
        }
        if self.ptx is not None:
            state["ptx"] = self.ptx.state_dict()
        return state

    def save_checkpoint(self, step: int, pending: list[tuple[list[Trajectory], float, dict]] = ()) -> Path:
        """``pending``: a streaming run's batches sampled already for the next steps, in order,
        as the buffer holds them (trajectories, rollout seconds, rollout figures), so a resumed
        run trains on and logs exactly those."""
        store = CheckpointStore(self.out / "checkpoints", self.cfg.checkpoint.keep_last)
        tmp = store.begin(step)
        self.learner.save_checkpoint(str(tmp / "learner"))
        copy_policy_files(self.policy_dir, tmp / "hf")
        (tmp / "config.yaml").write_text(dump_config(self.cfg))
        state = self.state_dict()
        if pending:
            state["pending_rollout_stats"] = write_pending(tmp / PENDING_FILE, step, pending)
        if self.partial is not None:  # after the pending rollouts: the responses they left unfinished
            state["partial_groups"] = self.partial.save(tmp / PARTIAL_FILE)
        return store.commit(tmp, step, state)

    def resume(self, checkpoint: Path) -> list[tuple[list[Trajectory], float, dict]]:
        """Restore learner and driver state from ``checkpoint``, re-sync the rollout weights,
        trim metrics.jsonl to the checkpoint's step; returns the saved batches of the next steps
        (a streaming run's), in order, as ``_rollout`` returns a batch (trajectories, rollout
        time 0, its rollout figures)."""
        state = check_resume(checkpoint, Path(self.policy_dir), self.algorithm)  # `flywheel train` ran it already
        try:
            self.prompts.load_state_dict(state["prompts"])
        except ValueError as exc:
            raise UserError(f"checkpoint: {exc}") from None
        version = self.learner.load_checkpoint(str(Path(checkpoint) / "learner"))
        self.start_step, self.draws = int(state["step"]), int(state["draws"])
        self.displacement.streak = int(state["displacement_streak"])
        if self.ptx is not None and "ptx" in state:
            self.ptx.load_state_dict(state["ptx"])
        self.rollout.sync_weights(self.learner.publish_weights(), version)
        trim_metrics(self.out / "metrics.jsonl", self.start_step)
        trim_trajectories(self.out / "rollouts.pb", self.start_step)
        print(f"resumed from {checkpoint}: step {self.start_step}, policy version {version}")
        if self.partial is not None:
            self.partial.load(Path(checkpoint) / PARTIAL_FILE, state.get("partial_groups", []))
        return read_pending(Path(checkpoint) / PENDING_FILE, state.get("pending_rollout_stats", []))

    def save_policy(self) -> Path:
        """The trained policy as a HF directory (weights from the learner, config/tokenizer copied)."""
        return write_policy(self.out / "policy", self.policy_dir, self.learner.export_weights())


def done_future(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future

