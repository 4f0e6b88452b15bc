"""Plain data -> typed dataclasses: the parsing rules behind the config schema (schema-agnostic).

Values come from YAML or from ``key=value`` strings already YAML-parsed; each is parsed to its field's
type (``bool``/``int``/``float``/``str``, ``Literal``, ``X | None``, lists and tuples, nested
dataclasses), and an unknown key is reported with the closest valid one. Range checks belong to the
schema (``config.validate``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tokencompose.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad config key or value; ``key`` is the dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class ConfigFileError(ConfigError):
    """A config file that is not valid YAML or repeats a key: names the file and the line."""

    def __init__(self, path: Any, line: int | str, message: str, key: str = "<file>") -> None:
        UserError.__init__(self, f"config file {path}, line {line}: {message}")
        self.key = key


def load_yaml_text(text: str, path: Any) -> Any:
    """Parse a config file's text strictly: a repeated key or a syntax error is a :class:`ConfigFileError`.

    PyYAML lets the last of two equal keys win silently, which hides a typo'd override of a setting;
    its syntax errors span several lines. Both become one line naming ``path`` and the line number.
    """
    try:
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path, "", set())
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else "?"
        what = " ".join(x for x in (err.context, err.problem) if x)
        raise ConfigFileError(path, line, f"not valid YAML ({what})") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(path, "?", f"not valid YAML ({' '.join(str(err).split())})") from None


def _check_duplicate_keys(node: Any, path: Any, prefix: str, seen_nodes: set[int]) -> None:
    """Walk a composed YAML node tree; raise on a mapping that holds one key twice (``prefix``: dotted)."""
    if node is None or id(node) in seen_nodes:  # aliases share nodes: visit each once
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if name is not None and name != "<<":  # "<<" is YAML's merge key, not a setting
                line = key_node.start_mark.line + 1
                if name in lines:
                    dotted = prefix + str(name)
                    raise ConfigFileError(
                        path, line, f"key '{dotted}' appears twice (also on line {lines[name]}); keep one", dotted
                    )
                lines[name] = line
            _check_duplicate_keys(value, path, f"{prefix}{name}." if name is not None else prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path, prefix, seen_nodes)


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse(value: Any, tp: Any, key: str) -> Any:
    """Parse ``value`` (YAML data or an override string already YAML-parsed) to type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_null and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, str):  # "mid,up" or "100,300" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            if args and args[0] is not str:  # items are read as YAML scalars, as a key=value is
                value = [_yaml_scalar(v) for v in value]
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_parse(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        return origin(_parse(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # a command-line flag's text
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    """The error for an unknown key, suggesting the closest valid name."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(key, f"unknown key{hint}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A dataclass from plain data: typed parsing of every field, unknown keys rejected (no range checks)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise unknown_key(key, str(name), list(fields))
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A nested settings block given in part keeps its parent's defaults for the rest (a field declared
            # ``GenerationSettings(images_per_prompt=4)`` stays at 4 when only ``steps`` is set).
            kwargs[name] = build_dataclass(type(default), merge(to_dict(default), value), key)
        else:
            kwargs[name] = _parse(value, hints[name], key)
    return cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (calling its factory), or None when it has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings key by key, lists and scalars replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(key or text, f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` overrides in plain data; each key path is checked against the dataclass ``cls``."""
    data = merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node_cls: Any = cls
        node = data
        for i, part in enumerate(parts):
            key = ".".join(parts[: i + 1])
            fields = {f.name: f for f in dataclasses.fields(node_cls)} if dataclasses.is_dataclass(node_cls) else {}
            if part not in fields:
                raise unknown_key(key, part, list(fields)) if fields else ConfigError(key, "is not a section")
            tp = typing.get_type_hints(node_cls)[part]
            if i == len(parts) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(key, "is a value, not a section")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(key, "is a section in the schema but not in the file")
                node_cls = tp
    return data


def load_settings(
    cls: type, data: dict[str, Any] | None = None, overrides: list[str] | None = None, source: str | Path | None = None
) -> Any:
    """A command's typed settings: YAML file ``source`` (if any), then ``data`` (its flags), then dotted overrides.

    The one parsing path of every command (``train``'s config too): unknown keys suggest the closest name,
    ill-typed values name their key, a YAML file with a repeated key or a syntax error names file and line.
    """
    base: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError("--config", f"no settings file {path}")
        loaded = load_yaml_text(path.read_text(), path)
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", f"{path} must hold a mapping")
        base = loaded
    merged = merge(base, data or {})
    return build_dataclass(cls, apply_overrides(cls, merged, list(overrides or [])))
