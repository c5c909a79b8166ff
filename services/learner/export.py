"""``flywheel export CHECKPOINT OUT``: a Hugging Face directory from a training checkpoint.

The weights come from the DeepSpeed checkpoint in ``CHECKPOINT/learner/policy``, offline (no
process group, no Ray):
- ZeRO 1/2/3: DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` merges every
  rank's shard of the fp32 master weights (ZeRO-3 partitions included);
- ZeRO 0: the full weights are in ``mp_rank_00_model_states.pt``.
A LoRA run's (``learner.lora`` in its config.yaml) adapter is merged into the base weights.
Config and tokenizer come from ``CHECKPOINT/hf``. The weights are loaded into the model class
the config names (so tied embeddings are handled by transformers) and written with
``save_pretrained`` as fp32 safetensors, which transformers and vLLM load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.core.errors import UserError
from services.driver.checkpoint import STATE_FILE, CheckpointStore, newest_intact, verify_named_checkpoint
from services.learner.lora import lora_of_run, merged_state_dict


def learner_tag_dir(checkpoint: Path) -> tuple[Path, str]:
    """(``learner/policy``, its latest tag) of a Flywheel checkpoint, with clear errors. Its
    files are verified against its manifest first: a damaged checkpoint named is refused; of
    OUT/checkpoints the newest intact one is taken (with a warning naming the damaged file)."""
    if (checkpoint / STATE_FILE).is_file():
        verify_named_checkpoint(checkpoint, "export")
    else:  # OUT/checkpoints: take the latest intact one
        store = CheckpointStore(checkpoint)
        if not checkpoint.is_dir() or store.latest() is None:
            raise UserError(f"export: no complete Flywheel checkpoint at '{checkpoint}'")
        checkpoint = newest_intact(store)
    policy = checkpoint / "learner" / "policy"
    latest_file = policy / "latest"
    if not latest_file.is_file():
        raise UserError(f"export: '{checkpoint}' holds no DeepSpeed policy checkpoint ({latest_file} is missing)")
    return policy, latest_file.read_text().strip()


def checkpoint_state_dict(policy: Path, tag: str) -> dict:
    """Full fp32 weights of a DeepSpeed checkpoint (names as in the wrapped HF module)."""
    import torch

    folder = policy / tag
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(policy), tag=tag))
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    policy, tag = learner_tag_dir(checkpoint)  # a wrong path fails before the heavy imports

    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    root = policy.parent.parent
    hf = root / "hf"
    run_config = yaml.safe_load((root / "config.yaml").read_text())
    trust = bool(run_config["model"].get("trust_remote_code", False))
    weights = checkpoint_state_dict(policy, tag)
    if (lora := lora_of_run(run_config)) is not None:  # a LoRA run: the adapter merged into the base weights
        weights = merged_state_dict(weights, lora.scaling)
    config = AutoConfig.from_pretrained(hf, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    if unexpected or set(missing) - tied:
        raise UserError(
            f"export: the weights in '{policy / tag}' do not fit the model in '{hf}': "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    for path in hf.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    model.save_pretrained(out, safe_serialization=True)
    return out


__all__ = ["checkpoint_state_dict", "export_checkpoint", "learner_tag_dir"]
