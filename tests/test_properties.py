"""Property-based tests (hypothesis): the config merger and the MMIDIDX reader, on inputs nobody wrote by hand."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neox_llama.config.loading import ConfigError, load_raw, merge_layers
from neox_llama.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter

KEYS = st.sampled_from(["a", "b", "c", "d"])
LEAVES = st.one_of(st.integers(-5, 5), st.booleans(), st.text("xyz", max_size=3), st.lists(st.integers(0, 3), max_size=2))
TREES = st.recursive(LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)
LAYERS = st.lists(st.dictionaries(KEYS, TREES, max_size=4), min_size=1, max_size=4)


def _reference(layers: list[dict]) -> tuple[dict, dict[str, int]]:
    """Deep merge, later wins; a non-mapping replaces a mapping wholesale; leaf -> index of the layer that set it."""
    merged: dict = {}
    owner: dict[str, int] = {}

    def leaves(value, prefix):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from leaves(v, f"{prefix}.{k}")
        else:
            yield prefix, value

    def merge(dst, src, prefix, index):
        for key, value in src.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value, dotted + ".", index)
                continue
            for stale in [k for k in owner if k == dotted or k.startswith(dotted + ".")]:
                del owner[stale]
            dst[key] = value
            for leaf, item in leaves(value, dotted):
                if item != {}:  # an empty mapping is not a value: the merger credits mappings to their last toucher
                    owner[leaf] = index

    for index, layer in enumerate(layers):
        merge(merged, layer, "", index)
    return merged, owner


@given(LAYERS)
def test_merging_equals_a_reference_deep_merge_and_names_each_leafs_layer(layers):
    import copy

    merged, sources = merge_layers([(f"file{i}.yml", copy.deepcopy(layer)) for i, layer in enumerate(layers)])
    expected, owner = _reference(copy.deepcopy(layers))
    assert merged == expected
    for leaf, index in owner.items():
        assert sources[leaf] == f"file{index}.yml", (leaf, sources)


@given(st.lists(st.tuples(st.sampled_from(["seed", "train_iters", "log_interval"]), st.integers(0, 10**6)),
                min_size=1, max_size=6))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
def test_command_line_overrides_win_in_order(overrides):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "a.yml"
        base.write_text("seed: 1\ntrain_iters: 2\n")
        raw, sources = load_raw([base], [f"{k}={v}" for k, v in overrides], apply_presets=False)
    last = dict(overrides)
    for key, value in last.items():
        assert raw[key] == value and sources[key] == "command line"


DOCS = st.lists(st.lists(st.integers(0, 65_535), min_size=0, max_size=40), min_size=0, max_size=12)


@given(DOCS, st.sampled_from([np.uint16, np.int32]))
@settings(max_examples=60)
def test_mmidx_round_trip_is_exact(docs, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "d"
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for doc in docs:
                writer.add_document(doc)
        ds = IndexedDataset(prefix)
        assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
        assert [ds[i].tolist() for i in range(len(ds))] == docs
        flat = [t for d in docs for t in d]
        assert ds.max_token_id() == (max(flat) if flat else None)


@given(DOCS.filter(lambda d: sum(map(len, d)) > 0), st.sampled_from(["idx", "bin"]), st.data())
@settings(max_examples=60)
def test_a_truncated_or_grown_file_is_always_a_named_dataset_error(docs, which, data):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "d"
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for doc in docs:
                writer.add_document(doc)
        path = Path(f"{prefix}.{which}")
        raw = path.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1))
        grown = data.draw(st.booleans())
        path.write_bytes(raw + b"\0" * (cut + 1) if grown else raw[:cut])
        try:
            IndexedDataset(prefix)
        except IndexedDatasetError as err:
            assert str(path) in str(err) or f"{prefix}.idx" in str(err)
        else:
            raise AssertionError(f"{which} {'grown' if grown else 'cut'} at {cut}: read without an error")


@given(st.text(max_size=40))
@settings(max_examples=60)
def test_any_yaml_text_is_loaded_or_refused_with_the_files_name(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.yml"
        path.write_text(text, encoding="utf-8")
        try:
            load_raw([path], apply_presets=False)
        except ConfigError as err:
            assert all(line.startswith(str(path)) for line in err.problems), err.problems
