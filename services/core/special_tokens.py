"""A model's tokenizer must be able to pad: batches are padded with its pad token or, where it
has none, with its eos token (the usual choice for causal LMs, and the one every stage makes).
A tokenizer with neither used to fail deep inside a stage (a DeepSpeed rank, the toy
evaluation's ``generate``); :func:`load_padding_tokenizer` refuses it up front, naming the
setting and the files to fix. transformers is imported on call only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.core.errors import UserError


def pad_token_id(tokenizer: Any) -> int | None:
    """The id batches are padded with: the pad token's, else the eos token's (None: neither)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def require_padding(tokenizer: Any, path: str | Path, setting: str) -> Any:
    """``tokenizer``, its pad token set to its eos token when it has none; a UserError naming
    ``setting`` (the model directory's setting, e.g. ``model.path``) when it has neither."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise UserError(f"{setting}: the tokenizer in {path} has neither a pad token nor an eos token; set one "
                        f"(pad_token or eos_token in {Path(path) / 'tokenizer_config.json'})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_padding_tokenizer(path: str | Path, setting: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer in the model directory ``path`` (``setting`` names it, e.g. ``model.path``),
    checked by :func:`require_padding`; a UserError when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{setting}: could not load the tokenizer in {path}: {exc}") from None
    return require_padding(tokenizer, path, setting)


__all__ = ["pad_token_id", "require_padding", "load_padding_tokenizer"]
