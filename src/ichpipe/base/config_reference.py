"""The configuration reference (docs/configuration.md), generated from the pydantic models of ichpipe.base.config, so
that it cannot drift from them: every key, its type and bounds or choices, its default, and what it is for (the
comment beside or above the field in the source).

    python -m ichpipe.base.config_reference > docs/configuration.md      (make docs)
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import typing
from typing import Annotated, Literal

from pydantic import BaseModel

from ichpipe.base.config import Config

INTRO = """# Configuration reference

Generated from the typed models in `src/ichpipe/base/config.py` by `make docs`; a test keeps it equal to them.

Configs are YAML files in `configs/` (`configs/demo/`, `configs/benchmark/`, `configs/real/`, `configs/ensemble/`,
`configs/search/`), validated into these models. A YAML may start with `base: other.yaml` (relative to itself) and
override part of it. On the command line, `key=value` pairs with dotted keys override anything
(`make train fold=0 train.lr=3e-4`); values are read as YAML, and mapping keys take the field's type
(`blend.epoch_weights.2=0.5` is epoch 2). An unknown key, a key set twice in one file, a value of the wrong type or
outside its range or choices stops the run before any work, with one line naming the key. The resolved config is
written beside every stage's output. An experiment is a new YAML, never a copied script.
"""


def field_notes(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the source of ``model``: the comment lines just above it and the one beside it."""
    notes, pending = {}, []
    for line in textwrap.dedent(inspect.getsource(model)).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r" {4}(\w+):", line)
        if m and m.group(1) in model.model_fields:
            beside = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            notes[m.group(1)] = " ".join([*pending, beside]).strip()
        if not line.startswith("        "):  # a new statement of the class body, not a continuation line
            pending = []
    return notes


BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _bounds(metadata) -> list[str]:
    return [f"{sign} {getattr(m, name)}" for m in metadata for name, sign in BOUNDS if getattr(m, name,
                                                                                               None) is not None]


def type_words(annotation, metadata=()) -> str:
    """``integer >= 1``, ``one of: adamw, adam``, ``list of number``: how a reader sees a field's type (pydantic keeps
    a field's bounds in its metadata; those of a type alias stay in its ``Annotated``)."""
    bounds = _bounds(metadata)
    while typing.get_origin(annotation) is Annotated:
        annotation, *meta = typing.get_args(annotation)
        bounds += _bounds(meta) + [b for m in meta for b in _bounds(getattr(m, "metadata", []))]
    bounds = [b for b in dict.fromkeys(bounds) if "9223372036854775807" not in b and "-9223372036854775808" not in b]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin is list:
        return f"list of {type_words(args[0])}"
    if origin is dict:
        return f"mapping {type_words(args[0])} → {type_words(args[1])}"
    name = {int: "integer", float: "number", bool: "true/false", str: "text"}.get(annotation, getattr(
        annotation, "__name__", str(annotation)))
    return " ".join([name, *bounds])


def _default(model: type[BaseModel], name: str) -> str:
    value = model.model_fields[name].get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    text = repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def _sections(model: type[BaseModel], prefix: str = ""):
    yield prefix, model
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _sections(info.annotation, f"{prefix}{name}.")


def reference() -> str:
    """docs/configuration.md."""
    lines = [INTRO]
    for prefix, model in _sections(Config):
        title = prefix.rstrip(".") or "top level"
        doc = inspect.getdoc(model) if model.__doc__ and model is not Config else ""
        lines += [f"## `{title}`" if prefix else "## Top level", ""] + ([doc, ""] if doc else [])
        lines += ["| key | type | default | what it is |", "|---|---|---|---|"]
        notes = field_notes(model)
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                continue  # its own section
            note = notes.get(name, "").replace("|", "\\|")
            kind = type_words(info.annotation, info.metadata)
            lines.append(f"| `{prefix}{name}` | {kind} | {_default(model, name)} | {note} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
