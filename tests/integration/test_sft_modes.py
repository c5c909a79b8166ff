"""SFT with real DeepSpeed on CPU: ZeRO stages agree, any HF causal LM with a chat template
trains on a user dataset with loss on response tokens only, and bad input exits 2."""

from __future__ import annotations

import json

import pytest
import yaml

from services.core.config import ToyModelConfig
from services.core.metrics import read_metrics
from services.core.tiny_model import build_toy_llama
from services.learner.sft_data import IGNORE, encode_example
from tests.conftest import run_flywheel, save_tiny_llama

pytestmark = pytest.mark.slow
TINY = ["data.toy_size=200", "learner.epochs=1", "data.eval_prompts=0", "learner.micro_batch_size=16"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    runs = {}
    for stage in (0, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}")
        proc = run_flywheel("sft", "sft-toy", "--out", str(out), f"learner.zero_stage={stage}", *TINY)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[stage] = out
    return runs


def test_zero_stages_train_the_same_weights(zero_runs):
    """One rank, fp32: ZeRO-2 and ZeRO-3 (gathered at save) must match plain data parallel."""
    import torch
    from transformers import AutoTokenizer

    reference = _weights(zero_runs[0] / "model")
    tokenizer = AutoTokenizer.from_pretrained(zero_runs[0] / "model")
    init = build_toy_llama(ToyModelConfig(), tokenizer, seed=0).state_dict()
    moved = max((reference[k] - init[k]).abs().max().item() for k in reference)
    assert moved > 1e-3, "training did not change the weights"
    for stage in (2, 3):
        weights = _weights(zero_runs[stage] / "model")
        assert set(weights) == set(reference)
        for name, tensor in reference.items():
            assert weights[name].shape == tensor.shape, (stage, name)
            torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=1e-4)
        losses = [r["train/loss"] for r in read_metrics(zero_runs[stage] / "metrics.jsonl")]
        ref_losses = [r["train/loss"] for r in read_metrics(zero_runs[0] / "metrics.jsonl")]
        assert losses == pytest.approx(ref_losses, rel=1e-4)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny HF causal LM directory with a chat template, standing in for any hub model."""
    texts = ["<|user|>what is two plus two<|eos|><|assistant|>four<|eos|>"] * 50 + ["hello world answer"] * 50
    return save_tiny_llama(tmp_path_factory.mktemp("chat-model"), texts, vocab_size=400, seed=1,
                           chat_template=CHAT_TEMPLATE, num_layers=1, intermediate_size=128)


def test_chat_template_masks_the_prompt(chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    ids, labels = encode_example(tokenizer, "what is two plus two", "four", 64, 32)
    assert len(ids) == len(labels)
    n_prompt = labels.count(IGNORE)
    assert tokenizer.decode(ids[:n_prompt]) == "<|user|>what is two plus two<|eos|><|assistant|>"
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(labels[n_prompt:]) == "four<|eos|>"
    # truncation keeps the end of the prompt and the start of the response
    ids, labels = encode_example(tokenizer, "what is two plus two", "four", 3, 1)
    assert len(ids) == 4 and labels[:3] == [IGNORE] * 3


def _write_config(tmp_path, **sections) -> str:
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_sft_on_a_hf_model_and_jsonl_dataset(chat_model_dir, tmp_path):
    rows = [{"question": f"what is {a} plus {a}", "answer": f"{2 * a}"} for a in range(40)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _write_config(
        tmp_path,
        model={"path": str(chat_model_dir)},
        data={"source": str(data), "prompt_key": "question", "response_key": "answer"},
        learner={"epochs": 4, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 2},
    )
    proc = run_flywheel("sft", config, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")]
    assert len(losses) == 4 * 5
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "before" not in summary  # gold-reward evaluation is for the toy world only
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "model").chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.path=/no/such/model"], "model.path: no model directory at '/no/such/model'"),
        (["model.dtype=fp16"], "model.dtype: fp16 is not supported by DeepSpeed on CPU"),
        (["data.source=MISSING.jsonl"], "data.source: file not found"),
    ],
)
def test_bad_input_exits_2_without_traceback(overrides, expected, chat_model_dir, tmp_path):
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    config = _write_config(tmp_path, model={"path": str(chat_model_dir)}, data={"source": str(data)})
    proc = run_flywheel("sft", config, "--out", str(tmp_path / "out"), *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dataset_row_without_response_names_file_and_line(chat_model_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e"}\n')
    config = _write_config(tmp_path, model={"path": str(chat_model_dir)}, data={"source": str(data)})
    proc = run_flywheel("sft", config, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{data}:3" in proc.stderr and "response" in proc.stderr
    assert "Traceback" not in proc.stderr
