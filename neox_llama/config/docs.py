"""Generate the config reference (docs/config.md) from the schema, so the docs cannot drift from the code.

    python -m neox_llama.config.docs            # rewrite docs/config.md
    python -m neox_llama.config.docs --check    # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import yaml

from neox_llama.config.schema import GROUPS, Derived
from neox_llama.config.typecheck import describe_type, user_fields
from neox_llama.utils.files import atomic_write_text

DOC_PATH = Path("docs") / "config.md"
"""The reference, relative to the repository root (this is a developer tool, run from a clone)."""

INTRO = """# Configuration reference

Generated from `neox_llama/config/schema.py` by `python -m neox_llama.config.docs`; do not edit by hand
(a test fails when this file is stale).

YAML files are merged left to right and `key=value` arguments override last (dotted for nested keys:
`optimizer.params.lr=1e-4`). Keys are flat, as in GPT-NeoX; the groups below only organise this page.
Numbers such as `1e-5` are read as floats. An unknown key, a wrong type or a value out of range is an
error naming the file and key; every problem is reported at once, before any process starts.
"""


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(see below)"
    else:
        value = f.default
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"


def _type_text(tp: typing.Any) -> str:
    return describe_type(tp).replace("|", "\\|")


def _nested_dataclasses(tp: typing.Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]


def _table(cls: type, prefix: str = "") -> tuple[list[str], list[tuple[str, type]]]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type]] = []
    for f in user_fields(cls):
        tp = hints[f.name]
        inner = _nested_dataclasses(tp)
        type_text = "mapping" + (" or null" if type(None) in typing.get_args(tp) else "") if inner else _type_text(tp)
        bounds = []
        if f.metadata.get("minimum") is not None:
            bounds.append(f">= {f.metadata['minimum']:g}")
        if f.metadata.get("maximum") is not None:
            bounds.append(f"<= {f.metadata['maximum']:g}")
        if bounds:
            type_text += ", " + ", ".join(bounds)
        rows.append(f"| `{prefix}{f.name}` | {type_text} | {_default_text(f)} | {f.metadata['doc']} |")
        nested.extend((f"{prefix}{f.name}.", c) for c in inner)
    return rows, nested


def render_reference() -> str:
    """The whole reference as Markdown."""
    out = [INTRO]
    for group in GROUPS:
        title = group.__doc__.strip().splitlines()[0].rstrip(".")
        out.append(f"## {title}\n")
        rows, nested = _table(group)
        out.extend(rows)
        out.append("")
        while nested:
            prefix, cls = nested.pop(0)
            out.append(f"### `{prefix.rstrip('.')}`: {cls.__doc__.strip().splitlines()[0]}\n")
            rows, more = _table(cls, prefix)
            out.extend(rows)
            out.append("")
            nested = more + nested
    out.append("## Derived values (computed, not set)\n")
    out.append("Every rank computes these from the config and the world size (`cfg.derived`):\n")
    for f in dataclasses.fields(Derived):
        out.append(f"- `{f.name}`: {f.metadata['doc']}")
    out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = render_reference()
    if "--check" in argv:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run python -m neox_llama.config.docs", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(DOC_PATH, text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
