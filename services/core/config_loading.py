"""Load a FlywheelConfig from a YAML file or a preset name, with dotted overrides.

Errors name the file, the line and the field path, e.g.
``my.yaml:7: learner.lr: Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services.core.config import SCORER_FIELDS, FlywheelConfig, SettingError, used_dump
from services.core.errors import UserError

PRESET_PACKAGE = "services.presets"


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files(PRESET_PACKAGE).iterdir()
        if p.name.endswith(".yaml")
    )


def resolve_config_path(name_or_path: str) -> Path:
    """A path to an existing file, or the name of a preset shipped inside the package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"config path is a directory, not a YAML file: {name_or_path}")
    if name_or_path in preset_names():
        return Path(str(resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"))
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise UserError(f"config file not found: {name_or_path}")
    raise UserError(
        f"unknown preset '{name_or_path}' (not a file either); presets: {', '.join(preset_names())}"
    )


def _default_at(keys: list[str]) -> Any:
    """The default value (as plain data) at a dotted path, or None when there is none."""
    node: Any = yaml.safe_load(dump_config(FlywheelConfig()))  # as dumped: only the fields each choice reads
    for key in keys:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, keys[: depth + 1])]
        else:
            if node.get(key) is None:
                # A section the YAML leaves out starts empty (pydantic fills in defaults), but a
                # list must start from its default so that e.g. reward.scorers.0.kind can index it.
                default = _default_at(keys[: depth + 1])
                node[key] = copy.deepcopy(default) if isinstance(default, list) else {}
            node = node[key]
        if not isinstance(node, (dict, list)):
            raise UserError(f"override {dotted}: '{'.'.join(keys[: depth + 1])}' is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys)] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise UserError(f"override {'.'.join(keys)}: '{key}' is not an index of a {len(node)}-item list")
    return int(key)


def parse_override(text: str) -> tuple[str, Any]:
    """``algorithm.kl_coef=0.05`` -> ("algorithm.kl_coef", 0.05); values are parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key, value


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the deepest YAML node reachable along a pydantic error location."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            key = next((k for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line = (key.start_mark.line + 1) if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_errors(
    exc: ValidationError, source: str, root: yaml.Node | None, overridden: dict[str, str]
) -> str:
    lines = [f"{source}: {exc.error_count()} error(s) in config"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SettingError):  # the error belongs to the field, not its section
            loc = (*loc, cause.key)
            given = err["input"].get(cause.key) if isinstance(err["input"], dict) else None
            err = {**err, "msg": str(cause), "input": given}
        dotted = ".".join(str(p) for p in loc) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        shown = err["type"] not in ("missing", "extra_forbidden") and not isinstance(err["input"], (dict, list))
        got = f" (got {err['input']!r})" if shown else ""
        origin = next(
            (o for k, o in overridden.items() if k == dotted or k.startswith(dotted + ".") or dotted.startswith(k + ".")),
            None,
        )
        if origin is not None:
            where = f"override '{origin}'"
        else:
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line else source
        lines.append(f"  {where}: {dotted}: {msg}{got}")
    return "\n".join(lines)


def _check_duplicate_keys(node: yaml.Node | None, path: Path, seen_nodes: set[int] | None = None) -> None:
    """YAML keeps the last of two equal keys in a mapping without a word; here it is an error."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias (even a recursive one) is checked once
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise UserError(
                        f"{path}:{key.start_mark.line + 1}: invalid YAML: duplicate key '{key.value}' "
                        f"(first at line {seen[key.value]})"
                    )
                seen[key.value] = key.start_mark.line + 1
            _check_duplicate_keys(value, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path, seen_nodes)


def read_utf8(path: Path) -> str:
    """The file's text; UserError naming the file and line when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def load_config(name_or_path: str, overrides: list[str] | None = None) -> FlywheelConfig:
    """Read YAML (file or preset name), apply dotted overrides, validate. Raises UserError."""
    path = resolve_config_path(name_or_path)
    text = read_utf8(path)
    try:
        root = yaml.compose(text)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        started = ""
        if context and cmark and mark and cmark.line != mark.line:
            started = f" ({context} at line {cmark.line + 1})"
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}{started}") from None
    _check_duplicate_keys(root, path)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    overridden: dict[str, str] = {}
    for text_override in overrides or []:
        key, value = parse_override(text_override)
        _set_dotted(tree, key, value)
        overridden[key] = text_override
    try:
        return FlywheelConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_format_errors(exc, str(path), root, overridden)) from None


def dump_config(cfg: FlywheelConfig) -> str:
    """The resolved config as YAML; the algorithm section and each scorer list only the
    settings their choice reads, so the file loads again."""
    data = cfg.model_dump(mode="json")
    data["algorithm"] = used_dump(cfg.algorithm, cfg.algorithm.used_fields())
    data["reward"]["scorers"] = [used_dump(s, SCORER_FIELDS[s.kind]) for s in cfg.reward.scorers]
    return yaml.safe_dump(data, sort_keys=False)
