"""Strict typed loading of nested dataclasses from YAML and ``--set`` overrides, every error located.

``build`` makes a dataclass from a mapping: unknown keys are refused with the nearest valid key, values are coerced
to their type hints (``Literal``, ``Optional``, lists, tuples, nested dataclasses; numbers written as strings such as
``1e-4``), and a field's own range check (``FieldError``, raised in the dataclass's ``__post_init__``; ``at_least``
and ``finite`` write the usual ones) is located too. ``Origins`` knows which key came from the file and which from a
``--set`` argument, so every ``ConfigError`` names what to edit. ``read_yaml`` reads a file strictly too: UTF-8 only,
and a key given twice in one mapping is refused (``UniqueKeyLoader``; ``--set`` values are parsed with it as well).
The run's schema is ``miss_ds.run_config``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .config import ConfigError


class FieldError(ValueError):
    """One field's value is out of its range: raised by a dataclass's ``__post_init__``, located by ``build`` (which
    knows whether the file or a ``--set`` argument gave it)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key = key


@dataclass(frozen=True)
class Origins:
    """Where the keys of a run config came from, for error messages: a file (or a stored config) and the ``--set``
    arguments applied over it."""

    source: str
    overrides: tuple[str, ...] = ()
    file: dict[str, Any] = field(default_factory=dict)
    """The mapping the source held before the overrides."""

    def of(self, key: str) -> str:
        """What set ``key`` (dotted, ``[i]`` for list items; a section too): the last ``--set`` of it or of a section
        above it; else the source, with the ``--set`` arguments that changed keys below it (those alone when the
        source lacks the key)."""
        key = key.rstrip(".")
        sets = [(item.partition("=")[0], f"--set {item!r}") for item in self.overrides]
        for set_key, where in reversed(sets):
            if is_under(key, set_key):
                return where
        below = ", ".join(where for set_key, where in sets if key and is_under(set_key, key))
        if not below:
            return self.source
        return f"{self.source} with {below}" if dotted_value(self.file, key) is not ABSENT else below


def is_under(key: str, section: str) -> bool:
    """Whether dotted ``key`` is ``section`` or inside it."""
    return key == section or key.startswith((section + ".", section + "["))


class _Absent:
    """What ``dotted_value`` finds where a config has no such key."""


ABSENT = _Absent()


def dotted_value(tree: Any, key: str) -> Any:
    """The value at dotted ``key`` (``data.sources[1].path``) in nested mappings and lists ``tree``, or ``ABSENT``."""
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return ABSENT
    return tree


def at_least(key: str, value: int, low: int) -> None:
    """Refuse an integer ``value`` of ``key`` below ``low``."""
    if value < low:
        raise FieldError(key, f"is {value}; it must be at least {low}")


def finite(key: str, value: float, ok: bool, valid: str) -> None:
    """Refuse a number ``value`` of ``key`` that is not finite or not ``ok``; ``valid`` says the range."""
    if not (math.isfinite(value) and ok):
        raise FieldError(key, f"is {value}; it must be {valid}")

def yaml_position(exc: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error, where it says."""
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping (``UniqueKeyLoader``); the message names the dotted key and both
    places, and whoever parsed the text adds whose text it is."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's ``SafeLoader`` that refuses a key given twice in one mapping, at any depth: PyYAML keeps the last one
    silently, so a second ``train:`` section would drop the whole first one. Keys a merge (``<<: *anchor``) brings
    in may be overridden, as YAML means them to be."""

    def construct_document(self, node: yaml.Node) -> Any:
        """The document, once ``refuse_duplicate_keys`` has checked its composed tree (before merges edit it)."""
        refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def refuse_duplicate_keys(node: yaml.Node, key: str, seen: set[int]) -> None:
    """Raise ``DuplicateKey`` for the first scalar key (same tag and text) given twice in a mapping under ``node``,
    the node at dotted ``key``; ``seen`` holds the nodes checked (an alias reuses its anchor's node)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            refuse_duplicate_keys(item, f"{key}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[tuple[str, str], yaml.Node] = {}
    for key_node, value in node.value:
        name = f"{key}.{key_node.value}" if key else str(key_node.value)
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            earlier = first.setdefault((key_node.tag, key_node.value), key_node)
            if earlier is not key_node:
                raise DuplicateKey(f"key '{name}' is given twice, at line {earlier.start_mark.line + 1}, column "
                                   f"{earlier.start_mark.column + 1} and line {key_node.start_mark.line + 1}, column "
                                   f"{key_node.start_mark.column + 1} (YAML would keep the second silently): "
                                   "merge the two into one")
        refuse_duplicate_keys(value, name, seen)


def read_yaml(path: Path) -> Any:
    """The YAML document of file ``path`` (safe types). Refused, naming the file: bytes that are not UTF-8 (where),
    text that is not YAML (where) and a key given twice in one mapping (``UniqueKeyLoader``)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} is not UTF-8 text: byte {exc.start} (line {line}) is "
                          f"{data[exc.start:exc.start + 1]!r}; save the file as UTF-8") from None
    try:
        return yaml.load(text, UniqueKeyLoader)
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{yaml_position(exc)} is not valid YAML: {getattr(exc, 'problem', exc)}") from None


def apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r} must look like section.key=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is not a section")
    try:
        node[leaf] = yaml.load(value, UniqueKeyLoader)
    except DuplicateKey as exc:
        raise ConfigError(f"--set {item!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML{yaml_position(exc)}: "
                          f"{getattr(exc, 'problem', exc)} (quote a string, close a list's brackets)") from None


def build(cls: type, raw: Any, origins: Origins, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    section = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise ConfigError(f"{origins.of(section)}: '{section or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{origins.of(f'{prefix}{key}')}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, origins, f"{prefix}{key}")
    missing = [f.name for f in fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{origins.of(section)}: '{prefix}{missing[0]}' is required and not set")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as exc:
        raise ConfigError(f"{origins.of(exc.key)}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise section_error(origins, section, exc) from None


def section_error(origins: Origins, section: str, exc: Exception) -> ConfigError:
    """A section's own refusal, located at the key its message starts with (``MissConfig.validate`` and
    ``DataConfig.validate`` name the key first), else at the section."""
    match = re.match(r"[\w.\[\]]+", str(exc))
    if section and match and is_under(match[0], section):
        return ConfigError(f"{origins.of(match[0])}: {exc}")
    return ConfigError(f"{origins.of(section)}: section '{section or 'top level'}': {exc}")


def _coerce(hint: Any, value: Any, origins: Origins, key: str) -> Any:
    if is_dataclass(hint):
        return build(hint, value, origins, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = origins.of(key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, origins, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1) \
                if isinstance(value, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: '{key}' is {value!r}; choose one of {list(args)}{hint}")
        return value
    if origin in (list, tuple):
        return _coerce_items(origin, args, value, origins, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return value
    if hint is float:
        return _as_float(value, where, key)
    if hint in (int, str, bool) and not (type(value) is hint):
        quote = " (quote it: YAML read it as a number)" if hint is str and isinstance(value, (int, float)) else ""
        raise ConfigError(f"{where}: '{key}' must be {hint.__name__}, got {value!r}{quote}")
    return value


def _coerce_items(origin: type, args: tuple, value: Any, origins: Origins, key: str) -> Any:
    """A list (``list[X]``: any length) or a tuple (``tuple[X, Y]``: that many items), each item coerced to its
    type."""
    where = origins.of(key)
    if isinstance(value, str) and origin is list:
        raise ConfigError(f"{where}: '{key}' must be a list, got the string {value!r}")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
    if origin is tuple and args and ... not in args:
        if len(value) != len(args):
            raise ConfigError(f"{where}: '{key}' must be a list of {len(args)} values, got {value!r}")
        hints = args
    else:
        hints = (args[0] if args else Any,) * len(value)
    items = [_coerce(hint, item, origins, f"{key}[{i}]") for i, (hint, item) in enumerate(zip(hints, value))]
    return tuple(items) if origin is tuple else items

def _as_float(value: Any, where: str, key: str) -> float:
    """Numbers, and strings such as '1e-4' (YAML 1.1 reads an exponent without a dot as a string)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}") from None
