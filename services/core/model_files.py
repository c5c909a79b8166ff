"""A cheap check that a model directory's weight files are whole, before anything loads them.

A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of JSON header
(every tensor's dtype, shape and ``data_offsets`` [begin, end) into the data that follows),
then the data: its length must be 8 + N + the largest end offset. safetensors refuses a file
of any other length, but as "incomplete metadata, file not fully covered" from deep inside
transformers, vLLM or a DeepSpeed rank, after Ray and the actors started, and without the
file's name. :func:`check_model_files` reads the headers only (no tensor data) and names
the file; a sharded model's index must not name a shard that is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.core.errors import UserError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
INDEX_FILE = "model.safetensors.index.json"
REMEDY = "copy or download the model again (an interrupted copy or download leaves a file cut short)"


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file at ``path``; None when its length is the one
    its header gives."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return f"truncated: {size} bytes, fewer than the 8 that give the header's length"
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                return f"not a safetensors file: its first 8 bytes give a header of {header_len} bytes"
            if 8 + header_len > size:
                return f"truncated: {size} of at least {8 + header_len} bytes, cut inside its header"
            raw = file.read(header_len)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one too
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"its header gives no data_offsets for tensor '{name}'"
        end = max(end, offsets[1])
    expected = 8 + header_len + end
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"{size - expected} bytes longer than its header says ({size} instead of {expected} bytes)"
    return None


def check_index_shards(folder: Path, setting: str) -> None:
    """A sharded model's index (model.safetensors.index.json) must name only shards that exist."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted({str(shard) for shard in weight_map.values()})
    except (ValueError, AttributeError, TypeError):
        raise UserError(f"{setting}: {index} is damaged (not a JSON object with a weight_map); {REMEDY}") from None
    for shard in shards:
        if not (folder / shard).is_file():
            raise UserError(f"{setting}: {index} names the shard {shard}, which is missing from {folder}; {REMEDY}")


def check_model_files(directory: str | Path | None, setting: str) -> None:
    """UserError naming the first damaged ``*.safetensors`` file of the model directory
    ``directory`` (``setting``: the config field that names it). Nothing to check for None,
    a hub id or a path that is not a directory (the caller says what it needs there)."""
    if directory is None:
        return
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return
    check_index_shards(folder, setting)
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise UserError(f"{setting}: {path} is damaged ({problem}); {REMEDY}")


__all__ = ["check_model_files", "safetensors_problem", "MAX_HEADER_BYTES"]
