"""Command options as dataclasses: one dataclass per command holds every option and its default.

`build(cls, config, overrides)` makes an instance from the defaults, then a YAML file, then
overrides (the flags given on the command line), each later source winning. YAML keys are field
names; a nested dataclass field (``train``) takes a mapping (``train: {lr: 3e-4}``) or its fields
may be written flat (``lr: 3e-4``) when no other field has that name. Overrides use dotted names
(``{"train.lr": 3e-4}``). Fields whose metadata has ``path=True`` are read relative to the YAML
file, so a config works from any directory; fields marked ``internal=True`` are set by code only.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterator

import yaml


def path_field(default: Any = None, **kw: Any) -> Any:
    """A dataclass field holding a path (or list of paths): relative values in YAML are relative to the file."""
    return dataclasses.field(default=default, metadata={"path": True}, **kw)


def walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type) of every leaf field of a dataclass, nested dataclasses expanded."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(tp):
            yield from walk(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, tp


def _flatten(cls: type, loaded: dict, path: Path) -> dict[str, Any]:
    """YAML mapping -> {dotted name: value}, flat keys resolved to the one leaf of that name."""
    leaves = {name: f for name, f, _ in walk(cls)}
    by_tail: dict[str, list[str]] = {}
    for name in leaves:
        by_tail.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    out: dict[str, Any] = {}

    def add(key: str, value: Any, prefix: str) -> None:
        key = prefix + str(key).replace("-", "_")
        if isinstance(value, dict) and any(n.startswith(key + ".") for n in leaves):
            for k, v in value.items():
                add(k, v, key + ".")
            return
        if key not in leaves and not prefix and len(by_tail.get(key, [])) == 1:
            key = by_tail[key][0]
        if key not in leaves:
            raise ValueError(f"{path}: unknown option {key!r}; known: {', '.join(sorted(leaves))}")
        if leaves[key].metadata.get("path"):
            value = _relative(value, path.parent)
        out[key] = value

    for k, v in loaded.items():
        add(k, v, "")
    return out


def _relative(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_relative(v, base) for v in value]
    if isinstance(value, str) and not Path(value).expanduser().is_absolute():
        return str((base / value).resolve())
    return value


def read_yaml(cls: type, config: str | Path) -> dict[str, Any]:
    """The options a YAML file sets, as {dotted name: value}."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return _flatten(cls, loaded, path)


def build(cls: type, config: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """An instance of dataclass ``cls``: its defaults < the YAML file ``config`` < ``overrides``."""
    values = read_yaml(cls, config) if config is not None else {}
    leaves = {name for name, _, _ in walk(cls)}
    for k, v in (overrides or {}).items():
        if k not in leaves:
            raise ValueError(f"unknown option {k!r}; known: {', '.join(sorted(leaves))}")
        values[k] = v
    return _make(cls, values, "")


def _make(cls: type, values: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = prefix + f.name + "."
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            given = {k[len(sub):]: v for k, v in values.items() if k.startswith(sub)}
            kwargs[f.name] = dataclasses.replace(base, **given) if given else base
        elif prefix + f.name in values:
            kwargs[f.name] = _coerce(prefix + f.name, values[prefix + f.name], tp)
    return cls(**kwargs)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """YAML reads ``3e-4`` as a string and ``1`` where a float is meant: numbers become the field's type."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if len(args) == 1 and typing.get_origin(tp) is not list else tp
    if value is None or base not in (int, float) or isinstance(value, bool):
        return value
    try:
        number = base(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name}: {value!r} is not a{'n int' if base is int else ' number'}") from None
    if base is int and number != float(value):
        raise ValueError(f"option {name}: {value!r} is not an int")
    return number


def changed(obj: Any) -> dict[str, Any]:
    """{dotted name: value} of the fields of a dataclass instance that differ from its class's defaults."""
    default = type(obj)()
    out = {}
    for name, _, _ in walk(type(obj)):
        a, b = obj, default
        for part in name.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b:
            out[name] = a
    return out


def flags(obj: Any) -> str:
    """The command-line flags that reproduce a dataclass instance's non-default fields."""
    parts = []
    for name, v in changed(obj).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + name.replace("_", "-"))
        else:
            parts.append(f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}")
    return " ".join(parts)
