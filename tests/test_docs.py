"""The generated config reference is current, and every key is documented."""

from __future__ import annotations

import dataclasses

from neox_llama.config.docs import DOC_PATH, render_reference
from neox_llama.config.schema import GROUPS, Config, Derived
from neox_llama.config.typecheck import user_fields


def test_docs_config_md_is_not_stale():
    assert DOC_PATH.read_text(encoding="utf-8") == render_reference(), \
        "docs/config.md is stale: run python -m neox_llama.config.docs"


def test_every_key_has_a_doc_line_and_appears_in_the_reference():
    text = render_reference()
    classes = [*GROUPS, Derived]
    seen = set()
    while classes:
        cls = classes.pop()
        for f in dataclasses.fields(cls):
            if f.metadata.get("derived"):
                continue
            doc = f.metadata.get("doc", "")
            assert doc and "\n" not in doc, f"{cls.__name__}.{f.name} needs a one-line doc"
            assert f"`{f.name}`" in text or f".{f.name}`" in text, f.name
            seen.add(f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                classes.append(type(default))
    assert {f.name for f in user_fields(Config)} <= seen


def test_key_names_are_unique_across_groups():
    names = [f.name for group in GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names))
