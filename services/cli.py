"""The ``flywheel`` command. Heavy imports (torch, Ray, vLLM, DeepSpeed, gRPC) happen inside
subcommands: the modules that pull them in are imported there (the allow-list of
``tests/unit/test_layers.py``); the rest of the project is imported here."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from services.core.cluster_check import check_cluster
from services.core.config import RewardServerConfig
from services.core.config_loading import dump_config, load_config, preset_names, resolve_config_path
from services.core.errors import RunStopped, ServiceFailure, UserError
from services.core.out_lock import check_no_previous_outputs, out_lock
from services.core.word_problems import MAX_NUMBER
from services.driver.preflight import check_out_dir
from services.driver.rollout_scaling import parse_scale_args, write_scale_request
from services.driver.submit import run_submit
from services.example import write_example
from services.learner.export import export_checkpoint
from services.reward.ensemble import RewardEnsemble


VERBOSE = ["metrics.service_logs=terminal"]  # what --verbose adds to the overrides
WRITERS = {"train", "sft", "train-rm", "eval-rm", "demo", "study", "export"}  # commands that lock their OUT


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the services' own output (Ray, vLLM, DeepSpeed) in the terminal instead of "
                        "OUT/logs/<actor>.log (metrics.service_logs=terminal)")


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"write over {what} already in OUT (refused otherwise)")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file or preset name (see `flywheel presets`)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. algorithm.kl_coef=0.05"
    )


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    if args.cluster:
        # as YAML comments, so that stdout stays a loadable config
        print("".join(f"# {line}\n" for line in check_cluster(args.cluster, cfg)), end="")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        first = resolve_config_path(name).read_text().splitlines()[0].lstrip("# ")
        print(f"{name:24s} {first}")
    return 0


def run_config_command(args: argparse.Namespace, module: str, function: str) -> int:
    """Load CONFIG + overrides (config errors before the heavy imports), then call
    ``module.function(cfg, args.out)``: the shape of sft, train, train-rm and eval-rm."""
    cfg = load_config(args.config, args.overrides)
    getattr(importlib.import_module(module), function)(cfg, args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after: must be at least 1, got {args.stop_after}")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in OUT and --overwrite replaces it: pass one of them")
    cfg = load_config(args.config, args.overrides + VERBOSE * args.verbose)  # config errors before heavy imports
    from services.driver.train import run_train

    try:
        run_train(cfg, args.out, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except RunStopped as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    if args.train < 1 or args.test < 1:
        raise UserError(f"--train and --test: at least 1 problem each, got {args.train} and {args.test}")
    if args.max_number < 2:
        raise UserError(f"--max-number: at least 2, got {args.max_number}")
    target = Path(args.dir)
    if (target / "model").exists() or (target / "train.jsonl").exists():
        raise UserError(f"{target}: already holds an example (model/ or train.jsonl); choose another directory")
    summary = write_example(target, seed=args.seed, train=args.train, test=args.test, max_number=args.max_number)
    print(f"wrote {summary['train']} and {summary['test']} (GSM8K format: question, answer '... #### N'), "
          f"and {summary['model']} ({summary['parameters']:,} parameters, random init, ChatML chat template)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(f"exported {export_checkpoint(args.checkpoint, args.out)}")
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides).reward
    flags = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if flags:
        try:
            server_cfg = RewardServerConfig(**{**cfg.server.model_dump(), **flags})
        except ValidationError as exc:
            errors = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise UserError(errors) from None
        cfg = cfg.model_copy(update={"server": server_cfg})
    from services.reward.grpc_server import check_bind_allowed, format_address, serve_reward

    check_bind_allowed(cfg)  # before loading any model
    ensemble = RewardEnsemble(cfg)
    server, port = serve_reward(cfg, ensemble)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"serving reward ensemble {', '.join(ensemble.member_names)} ({cfg.aggregate}) on "
        f"{format_address(cfg.server.host, port)}",
        flush=True,
    )
    stop.wait()
    print("stopping reward server (finishing requests in flight)", flush=True)
    server.stop(grace=args.grace).wait()
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from services.driver.overopt_study import run_overopt_study

    if args.steps < 20:
        raise UserError(f"--steps: the study needs at least 20 steps to show a trend, got {args.steps}")
    run_overopt_study(args.out, steps=args.steps, kl_coef=args.kl_coef, rl_overrides=args.overrides)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    run_demo(args.out, steps=args.steps, rl_overrides=args.overrides + VERBOSE * args.verbose)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    path = write_scale_request(Path(args.out), parse_scale_args(args.sizes))
    print(f"asked the run in {args.out} for {' '.join(args.sizes)}: it applies it after its current step "
          f"(new workers take work once they are ready; see rollout/workers in metrics.jsonl) [{path}]")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    return run_submit(
        args.config, args.overrides, address=args.address, follow=args.follow, out=args.out,
        submission_id=args.submission_id, working_dir=args.working_dir, runtime_env_json=args.runtime_env_json,
        resume=args.resume,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel", description="Flywheel: distributed RLHF (SFT, reward models, PPO/GRPO/online DPO)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="print the resolved config, or every error with its field path")
    _add_config_args(p)
    p.add_argument("--cluster", metavar="CLUSTER_YAML",
                   help="also check a Ray cluster YAML or KubeRay manifest (Ray's validator) and that the run fits on it")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("presets", help="list the presets shipped with Flywheel")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("sft", help="supervised fine-tuning (toy world or any HF causal LM) with DeepSpeed")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (model/, metrics.jsonl, summary.json)")
    _add_overwrite(p, "an earlier SFT's model/, metrics.jsonl and summary.json")
    p.set_defaults(func=lambda a: run_config_command(a, "services.learner.sft", "run_sft"))

    p = sub.add_parser("train-rm", help="train a Bradley-Terry reward-model ensemble (ensemble.size members) with DeepSpeed")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (members/, ensemble.yaml, pairs/, eval.json)")
    _add_overwrite(p, "an earlier ensemble's members/, ensemble.yaml and pairs/")
    p.set_defaults(func=lambda a: run_config_command(a, "services.learner.reward_model", "run_train_rm"))

    p = sub.add_parser("eval-rm", help="reward-model accuracy, reward variance under a policy, member disagreement")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (eval.json)")
    _add_overwrite(p, "an earlier eval.json")
    p.set_defaults(func=lambda a: run_config_command(a, "services.reward.evaluation", "run_eval_rm"))

    p = sub.add_parser("train", help="RL training (ppo, grpo, online_dpo) on local Ray or a cluster")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (metrics.jsonl, checkpoints/, report/, policy/)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in OUT/checkpoints")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this run, with a checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh over a run in OUT: its checkpoints are deleted, its metrics.jsonl rewritten")
    _add_verbose(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("scale", help="resize a running run's rollout pool: `flywheel scale OUT rollout=N`")
    p.add_argument("out", help="the run's output directory (the --out of `flywheel train`)")
    p.add_argument("sizes", nargs="+", metavar="SERVICE=N", help="the new size, e.g. rollout=2")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("export", help="write a Hugging Face model directory from a training checkpoint")
    p.add_argument("checkpoint", help="a checkpoint directory (OUT/checkpoints/step-NNNNNN) or OUT/checkpoints")
    p.add_argument("out", help="the directory to write (config, tokenizer, model.safetensors)")
    _add_overwrite(p, "the files")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("submit", help="run `flywheel train` as a Ray job on a cluster (uploads the working directory)")
    _add_config_args(p)
    p.add_argument("--address", help="the cluster's Ray dashboard, e.g. http://HEAD:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--resume", action="store_true", help="the job continues from the latest checkpoint under --out")
    p.add_argument("--out", help="output directory on the cluster, absolute or ~/... (default: ~/flywheel-runs/SUBMISSION_ID)")
    p.add_argument("--submission-id", help="job id (default: flywheel-ALGORITHM-YYYYmmdd-HHMMSS-XXXX)")
    p.add_argument("--working-dir", help="directory uploaded with the job; the job runs in a copy of it (default: .)")
    p.add_argument("--runtime-env-json", metavar="JSON_OR_FILE",
                   help="extra Ray runtime env (env_vars, pip, excludes, ...), merged with Flywheel's")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("serve-reward", help="serve the reward ensemble (reward.scorers) over gRPC until SIGINT/SIGTERM")
    _add_config_args(p)
    p.add_argument("--host", help="bind address (default: reward.server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port; 0 picks a free one (default: reward.server.port, 50051)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish requests in flight on stop (default: 5)")
    p.set_defaults(func=cmd_serve_reward)

    p = sub.add_parser("study", help="research studies on the toy world: `overopt` (gold vs proxy reward against sqrt KL)")
    p.add_argument("name", choices=["overopt"], help="overopt: single RM vs ensemble mean / WCO / UWO (Gao et al., Coste et al.)")
    p.add_argument("--out", default="runs/overopt", help="output directory (default: runs/overopt)")
    p.add_argument("--steps", type=int, default=120, help="GRPO steps per proxy (default: 120)")
    p.add_argument("--kl-coef", type=float, default=0.01, help="KL coefficient, weak on purpose (default: 0.01)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="overrides for every GRPO run of the study, e.g. rollout.prompts_per_step=8",
    )
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("example", help="write a local chat test model (Qwen2) and GSM8K-format word problems to DIR")
    p.add_argument("dir", help="output directory: DIR/model, DIR/train.jsonl, DIR/test.jsonl")
    p.add_argument("--seed", type=int, default=0, help="generator and model seed (default: 0)")
    p.add_argument("--train", type=int, default=4000, help="training problems (default: 4000)")
    p.add_argument("--test", type=int, default=200, help="held-out problems (default: 200)")
    p.add_argument("--max-number", type=int, default=MAX_NUMBER,
                   help=f"largest addend (minuends up to 1.5x, factors 2..5); the difficulty (default: {MAX_NUMBER})")
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("demo", help="the embedded default: toy-world SFT, reward ensemble, GRPO against WCO, on local Ray")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=150, help="GRPO steps (default: 150)")
    _add_verbose(p)
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="overrides for the GRPO stage, e.g. metrics.prometheus_port=8000 metrics.prometheus_host=0.0.0.0",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting KEY=VALUE positionals at the first option (`--out X a=b`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "out", None) and args.func is not cmd_submit:  # submit's --out is the cluster's
            check_out_dir(Path(args.out))
        if args.command not in WRITERS:
            return args.func(args)
        out = Path(args.out).expanduser()
        check_no_previous_outputs(out, args.command, getattr(args, "overwrite", False))
        with out_lock(out, f"flywheel {args.command}"):
            return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except ServiceFailure as exc:  # a service that failed for good: the message says how to go on
        print(f"error: {exc}", file=sys.stderr)
        return ServiceFailure.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        # another Ctrl-C while Ray shuts down at exit leaves at once, with no traceback from
        # Ray's exit hook; the orphan reaper stops what is left of a local Ray
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        return 130


if __name__ == "__main__":
    sys.exit(main())
