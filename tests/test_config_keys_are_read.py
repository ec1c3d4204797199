"""An honest config: every schema key is read by the code it documents (a static check over the package)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from neox_llama.config.schema import Config
from neox_llama.config.typecheck import user_fields

PACKAGE = Path(__file__).resolve().parents[1] / "neox_llama"
SKIP = {"schema.py", "docs.py"}  # where keys are defined and documented, not read

DYNAMIC = {
    "model_name": ("config/loading.py", r'mapping\["model_name"\]'),
    **{f"{kind}_data_{what}": ("data/loader.py", r'getattr\(cfg, f"\{name\}_data_(?:paths|weights)"\)')
       for kind in ("train", "valid", "test") for what in ("paths", "weights") if f"{kind}_data_{what}" not in ("train_data_paths", "test_data_paths")},
    **{f"{kind}_label_data_paths": ("data/loader.py", r'getattr\(cfg, f"\{name\}_label_data_paths"\)')
       for kind in ("train", "valid", "test")},
}
"""Keys read without attribute access -> (their reader, the line that reads them)."""


def _keys(cls: type, prefix: str = ""):
    for f in user_fields(cls):
        yield prefix + f.name
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            yield from _keys(type(value), prefix + f.name + ".")


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8")
            for p in PACKAGE.rglob("*.py") if p.name not in SKIP}


def test_every_schema_key_is_read_somewhere():
    sources = _sources()
    unread = []
    for dotted in _keys(Config):
        if dotted in DYNAMIC:
            continue
        pattern = re.compile(rf"\.{dotted.split('.')[-1]}\b")
        if not any(pattern.search(text) for text in sources.values()):
            unread.append(dotted)
    assert not unread, f"schema keys that no code reads (build the reader, refuse the key, or remove it): {unread}"


def test_the_allowlist_names_real_readers_and_no_key_that_is_read_directly():
    sources = _sources()
    keys = set(_keys(Config))
    for key, (reader, evidence) in DYNAMIC.items():
        assert key in keys, f"{key} is not a schema key any more: drop it from the allowlist"
        assert re.search(evidence, sources[reader]), f"{reader} no longer reads {key} as the allowlist says"
        direct = re.compile(rf"\.{key}\b")
        assert not any(direct.search(t) for t in sources.values()), f"{key} is read directly: drop it from the allowlist"
