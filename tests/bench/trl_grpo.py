"""TRL's GRPOTrainer on the bench_vs_trl workload; runs in .venv-bench (`make bench-env`), never
in Flywheel's own environment. bench_vs_trl.py starts it with the settings Flywheel's run uses.

    .venv-bench/bin/python tests/bench/trl_grpo.py --policy DIR --train FILE --out DIR --steps N ...

Writes OUT/model (save_model) and OUT/timeline.jsonl: one line per optimizer step with its wall
time (time.time() at on_step_end) and TRL's logged metrics (completions/mean_length, reward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--train", required=True, help="jsonl with question and answer columns")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--prompts-per-step", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--kl-coef", type=float, required=True)
    parser.add_argument("--clip-range", type=float, required=True)
    parser.add_argument("--max-grad-norm", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generation", choices=["vllm-colocate", "transformers"], default="vllm-colocate")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tests.bench.bench_reward import correct

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                                 for r in rows])
    batch = args.prompts_per_step * args.samples
    config = GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=args.steps, seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,  # as Flywheel's
        max_grad_norm=args.max_grad_norm, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.samples, generation_batch_size=batch, num_iterations=1,
        max_completion_length=args.max_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.kl_coef, epsilon=args.clip_range, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, disable_dropout=True,
        use_vllm=args.generation == "vllm-colocate", vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
        vllm_importance_sampling_correction=False,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
    )
    timeline = (out / "timeline.jsonl").open("w")

    class Timeline(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "completions/mean_length" in logs:
                timeline.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")
                timeline.flush()

    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[correct], args=config,
                          train_dataset=dataset, callbacks=[Timeline()])
    trainer.train()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    timeline.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
