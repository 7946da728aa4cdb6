"""Reading configs: type coercion of plain dicts into dataclasses, TOML/JSON files, dotted overrides.

`from_dict(cls, data)` builds a config dataclass from JSON-like data, refusing unknown keys and wrong
types with a `NanoseekError` that names the field (`optim.lr: expected a number, got 'fast'`).

    >>> parse_value("3e-4"), parse_value("true"), parse_value("rope")
    (0.0003, True, 'rope')
    >>> data = {}; apply_override(data, "optim.lr", 3e-4); data
    {'optim': {'lr': 0.0003}}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Union

from nanoseek.errors import NanoseekError

# --------------------------------------------------------------------------------------------
# generic dataclass <-> dict with validation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(value: Any, tp, where: str):
    """Check `value` against the annotation `tp`; accept ints for floats. Raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise NanoseekError(f"{where}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except NanoseekError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise NanoseekError(errors[0])
        raise NanoseekError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise NanoseekError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise NanoseekError(f"{where}: expected a table/object, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise NanoseekError(f"{where}: expected a table/object, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise NanoseekError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise NanoseekError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise NanoseekError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise NanoseekError(f"{where}: expected a string, got {value!r}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to a misspelt `name`, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise NanoseekError(f"{where or 'config'}: expected a table/object of fields, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise NanoseekError(
            f"unknown config key {prefix + unknown[0]!r}{did_you_mean(unknown[0], names)}; "
            f"valid keys: {', '.join(names)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def check_choice(where: str, value: str, valid: tuple[str, ...]):
    if value not in valid:
        raise NanoseekError(f"{where}={value!r} is not valid; choose one of: {', '.join(valid)}")


def check_positive(where: str, value, allow_zero: bool = False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise NanoseekError(f"{where}={value} must be {'>= 0' if allow_zero else '> 0'}")


# --------------------------------------------------------------------------------------------
# files and overrides


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named; every way it can fail is one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise NanoseekError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise NanoseekError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NanoseekError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise NanoseekError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def load_config_file(path: str | Path) -> dict:
    """Read a TOML or JSON file into a plain dict (a file holding anything but a table is refused)."""
    path = Path(path)
    text = read_text_file(path, "config file")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error (RecursionError included) is the user's file
        raise NanoseekError(f"config file {path} could not be parsed: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise NanoseekError(f"config file {path} must hold a table/object of sections, not {type(data).__name__}")
    return data


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def parse_value(text: str):
    """Parse an override value as JSON (numbers, true/false, lists, null), else keep the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def apply_override(data: dict, dotted: str, value) -> None:
    """Set `data[a][b] = value` for `dotted = "a.b"`, creating tables as needed."""
    keys = dotted.split(".")
    if not all(keys):
        raise NanoseekError(f"bad override key {dotted!r}; use --section.field=VALUE")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise NanoseekError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def deep_update(dst: dict, src: dict):
    """Merge `src` into `dst` table by table; a later value wins over an earlier one."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
