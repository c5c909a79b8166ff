"""Load prompt/response (or prompt/chosen/rejected) rows from a user dataset.

``load_rows(source, keys)`` accepts a ``.jsonl`` file, a ``.parquet`` file, a directory written by
``datasets`` ``save_to_disk`` or a ``datasets`` hub name / local dataset directory. Every problem
with the user's data is a :class:`UserError` that names the file, the line (jsonl) or row
(parquet/datasets), the key, and the config field that selects the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from services.core.errors import UserError
from services.core.prompts import messages_problem

FILE_SUFFIXES = (".jsonl", ".parquet")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_rows(
    source: str,
    keys: list[str],
    split: str = "train",
    key_fields: dict[str, str] | None = None,
    check: Callable[[dict[str, Any]], str | None] | None = None,
    chat_keys: tuple[str, ...] = (),
    locations: list[str] | None = None,
    field: str = "data.source",
) -> list[dict[str, Any]]:
    """Rows (dicts holding at least ``keys``, each a string) from ``source``. Raises UserError.
    A key in ``chat_keys`` (also in ``keys``) may hold a chat messages list instead of a string.
    ``locations``, when given, receives each returned row's place for messages ("file:line",
    or "source: row i"). ``field``: the config field that names ``source``, for messages.

    ``key_fields`` maps a key to the config field that chose it (e.g. ``{"prompt": "data.prompt_key"}``)
    so that error messages can tell the user what to change. ``check(row)`` returns a problem
    with a row, or None; a problem becomes a UserError naming the file and line (or row).
    """
    key_fields = key_fields or {}
    check = check or (lambda row: None)
    kinds = {key: key in chat_keys for key in keys}
    places = locations if locations is not None else []
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"{field}: file not found: {source}")
        rows = (
            _load_jsonl(path, kinds, key_fields, check, places) if suffix == ".jsonl"
            else _load_parquet(path, kinds, key_fields, check, places)
        )
    else:
        rows = _load_datasets(source, kinds, split, key_fields, check, places, field)
    if not rows:
        where = f"{source} (split '{split}')" if suffix not in FILE_SUFFIXES else source
        raise UserError(f"{field}: dataset {where} has no rows")
    return rows


def _hint(key: str, key_fields: dict[str, str]) -> str:
    field = key_fields.get(key)
    return f" (set by {field}; point {field} at the right column)" if field else ""


def _value_problem(value: Any, chat: bool) -> str | None:
    """Why a key's value is not usable: not a string (or, for a chat key, a bad messages list)."""
    if isinstance(value, str):
        return None
    if chat and isinstance(value, list):
        return messages_problem(value)
    return f"must be a string{' or a chat messages list' if chat else ''}, got {_type_name(value)}"


def _load_jsonl(path: Path, keys: dict[str, bool], key_fields: dict[str, str], check, places: list[str]
                ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as fh:  # decoded per line, so that bad bytes are reported with their line
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = f"byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line"
                raise UserError(f"{path}:{lineno}: not valid UTF-8 ({bad}); jsonl files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in keys:
                if key not in row:
                    present = ", ".join(map(repr, row)) or "none"
                    raise UserError(
                        f"{path}:{lineno}: missing key '{key}'{_hint(key, key_fields)}; keys present: {present}"
                    )
                problem = _value_problem(row[key], keys[key])
                if problem:
                    raise UserError(f"{path}:{lineno}: key '{key}'{_hint(key, key_fields)} {problem}")
            problem = check(row)
            if problem:
                raise UserError(f"{path}:{lineno}: {problem}")
            rows.append(row)
            places.append(f"{path}:{lineno}")
    return rows


def _load_parquet(path: Path, keys: dict[str, bool], key_fields: dict[str, str], check, places: list[str]
                  ) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: could not read parquet file ({exc})") from None
    return _check_columns(str(path), table.column_names, table.to_pylist(), keys, key_fields, check, places)


def _load_datasets(
    source: str, keys: dict[str, bool], split: str, key_fields: dict[str, str], check, places: list[str],
    field: str = "data.source",
) -> list[dict[str, Any]]:
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise UserError(f"{field}: could not load dataset directory '{source}': {exc}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                split_field = "data.eval_split" if field == "data.eval_source" else "data.split"
                raise UserError(
                    f"{split_field}: split '{split}' not in {source}; splits: {', '.join(ds) or 'none'}"
                )
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{field}: could not load dataset '{source}': {first}") from None
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"{field}: '{source}' gave a {type(ds).__name__}, expected a Dataset")
    where = f"{source} (split '{split}')"
    return _check_columns(where, ds.column_names, ds.to_list(), keys, key_fields, check, places)


def _check_columns(
    where: str, columns: list[str], rows: list[dict[str, Any]], keys: dict[str, bool], key_fields: dict[str, str],
    check, places: list[str],
) -> list[dict[str, Any]]:
    for key in keys:
        if key not in columns:
            raise UserError(
                f"{where}: missing column '{key}'{_hint(key, key_fields)}; columns present: "
                f"{', '.join(columns) or 'none'}"
            )
    for index, row in enumerate(rows):
        for key in keys:
            problem = _value_problem(row[key], keys[key])
            if problem:
                raise UserError(f"{where}: row {index}: column '{key}'{_hint(key, key_fields)} {problem}")
        problem = check(row)
        if problem:
            raise UserError(f"{where}: row {index}: {problem}")
        places.append(f"{where}: row {index}")
    return rows


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
