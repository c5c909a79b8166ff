"""Per-sample extra columns <-> ``google.protobuf.Struct``.

Scorers take columns as ``{name: [value per sample]}``; on the wire each sample carries its
own Struct (``Sample.metadata``, ``Trajectory.columns``). Struct holds JSON values: strings,
numbers (as float64, so an int comes back as a float), bools, null, lists and dicts.
Anything else, or an int that float64 cannot hold exactly, is a ValueError naming the column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2

MAX_EXACT_INT = 2**53  # float64 holds every integer up to this exactly


def check_json_value(value: Any, where: str) -> None:
    """ValueError naming ``where`` unless ``value`` fits in a Struct without loss."""
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_INT:
            raise ValueError(f"{where}: integer {value} does not fit a float64 exactly (|value| > 2**53)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number (Struct holds JSON numbers)")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: dict key {key!r} is a {type(key).__name__}, not a str")
            check_json_value(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where}: a {type(value).__name__} cannot be sent in a protobuf Struct "
        "(use str, int, float, bool, None, lists or dicts of those)"
    )


def dict_to_struct(values: Mapping[str, Any], where: str = "columns") -> struct_pb2.Struct:
    """One sample's columns as a Struct (checked first: bad values name the column)."""
    struct = struct_pb2.Struct()
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: column name {key!r} is a {type(key).__name__}, not a str")
        check_json_value(value, f"{where} '{key}'")
    struct.update({key: list(v) if isinstance(v, tuple) else v for key, v in values.items()})
    return struct


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python (numbers as float, lists as list, dicts as dict; keys sorted)."""
    return dict(sorted(json_format.MessageToDict(struct).items()))


def columns_to_structs(columns: Mapping[str, Sequence[Any]] | None, n: int) -> list[struct_pb2.Struct]:
    """Columns ``{name: [value per sample]}`` as one Struct per sample (n samples)."""
    columns = dict(columns or {})
    for key, values in columns.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(f"column '{key}': expected a list with one value per sample, got {type(values).__name__}")
        if len(values) != n:
            raise ValueError(f"column '{key}' has {len(values)} values for {n} samples")
    return [dict_to_struct({key: values[i] for key, values in columns.items()}, "column") for i in range(n)]


def structs_to_columns(structs: Sequence[struct_pb2.Struct]) -> dict[str, list[Any]]:
    """Inverse of :func:`columns_to_structs`: one list per key over all samples, keys sorted
    (a Struct is a map: it keeps no order); a key that a sample lacks is None for that sample."""
    rows = [struct_to_dict(s) for s in structs]
    keys = sorted({key for row in rows for key in row})
    return {key: [row.get(key) for row in rows] for key in keys}


__all__ = [
    "check_json_value", "dict_to_struct", "struct_to_dict", "columns_to_structs",
    "structs_to_columns",
]
