"""YAML read safely: every config, search space and bundle.yaml goes through here. PyYAML's safe loader, refusing a
key set twice in one mapping, bounded in what nested aliases may expand to."""

from __future__ import annotations

from pathlib import Path

import yaml

from ichpipe.base.errors import InputError, first_line, quote

# What one YAML document may hold once its aliases are expanded (the configs here hold a few hundred values): a
# 400-byte file of nested aliases expands to billions, which validation, a copy or an error message would build.
MAX_YAML_VALUES = 100_000
MAX_YAML_CHARS = 10_000_000


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that sets one key twice (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        line = key_node.start_mark.line + 1
                        raise _DuplicateKey(f"line {line}: key {quote(key)} is set twice in one mapping; say each "
                                            f"setting once")
                    seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """PyYAML's safe load of ``text``, refusing a key set twice in one mapping (a yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def bound_yaml(data, where: str, error: type[Exception] | None = None):
    """``data`` (a loaded YAML document) if it holds at most :data:`MAX_YAML_VALUES` values and
    :data:`MAX_YAML_CHARS` characters once its aliases are expanded, else a one-line ``error`` naming ``where``."""
    values, chars, stack = 0, 0, [data]
    while stack:  # every value as a reader would see it: an alias counts each time it appears
        value = stack.pop()
        values += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            chars += len(value)
        if values > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
            raise (error or InputError)(f"{where}: expands to more than {MAX_YAML_VALUES:,} values or "
                                        f"{MAX_YAML_CHARS:,} characters (nested aliases?); not a config")
    return data


def load_yaml(text: str, where: str, error: type[Exception] | None = None):
    """A YAML document from ``text`` (read from ``where``), safely (:func:`parse_yaml`, :func:`bound_yaml`); what
    is wrong with it is a one-line ``error`` (default InputError) naming ``where``."""
    error = error or InputError
    try:
        data = parse_yaml(text)
    except _DuplicateKey as exc:
        raise error(f"{where}, {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{where}: not valid YAML ({first_line(exc, 160)})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be a config") from None
    return bound_yaml(data, where, error)


def read_yaml_mapping(path: Path, error: type[Exception] | None = None) -> dict:
    """A YAML file whose top level is a mapping (an empty file: {}), read by :func:`load_yaml`; else a one-line
    ``error`` (default InputError) naming the file."""
    error = error or InputError
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a text (UTF-8) file; a config is YAML text") from None
    data = load_yaml(text, str(path), error)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping")
    return data
