"""Bootstrap a tiny Llama for the toy world: a byte-level BPE tokenizer trained on the toy
corpus with `tokenizers`, and a small Llama-architecture model built from config.

Both save as a standard Hugging Face directory that transformers and vLLM load.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.core.config import ToyModelConfig

EOS, PAD = "<|eos|>", "<|pad|>"


def train_toy_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (no BOS; EOS ends every response; PAD for batching)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=4096
    )


def build_toy_llama(cfg: ToyModelConfig, tokenizer, seed: int):
    """A randomly initialised LlamaForCausalLM sized by ``cfg`` (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
