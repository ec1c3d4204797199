"""Packed samples, cached indices, splits, blending and resumable sampling."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from neox_llama.config import load_config
from neox_llama.data.gpt_dataset import BlendedDataset, DataError, GPTDataset, build_sample_index, split_ranges
from neox_llama.data.indexed import IndexedDataset, IndexedDatasetWriter
from neox_llama.data.loader import PretrainingSampler, build_datasets, build_loader

SEQ = 16


def write_dataset(prefix, n_docs=40, seed=0, offset=0):
    rng = np.random.RandomState(seed)
    docs = [rng.randint(3, 1000, size=rng.randint(1, 50)) + offset for _ in range(n_docs)]
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return docs


def test_every_sample_is_the_expected_slice_of_the_document_stream(tmp_path):
    docs = write_dataset(tmp_path / "d")
    ds = GPTDataset("train", str(tmp_path / "d"), (5, 35), SEQ, num_samples=200, seed=3)
    stream = np.concatenate([docs[i] for i in ds.doc_order])
    assert set(np.asarray(ds.doc_order)) == set(range(5, 35))  # only this split's documents
    epochs = len(ds.doc_order) // 30
    assert epochs >= 2 and len(ds) == 200  # several epochs, each its own permutation
    assert list(ds.doc_order[:30]) != list(ds.doc_order[30:60])
    for i in range(len(ds)):
        k = int(ds.shuffle[i])
        assert np.array_equal(ds[i], stream[k * SEQ:k * SEQ + SEQ + 1]), i
    assert sorted(ds.shuffle) == list(range(200)) and list(ds.shuffle) != list(range(200))


def test_index_is_cached_then_rebuilt_when_a_parameter_changes(tmp_path, caplog):
    write_dataset(tmp_path / "d")
    with caplog.at_level(logging.INFO, logger="neox_llama.data.gpt_dataset"):
        first = GPTDataset("train", str(tmp_path / "d"), (0, 40), SEQ, 50, seed=1)
        assert "built the train sample index" in caplog.text
        caplog.clear()
        again = GPTDataset("train", str(tmp_path / "d"), (0, 40), SEQ, 50, seed=1)
        assert "built" not in caplog.text  # loaded from the .npy cache
        assert np.array_equal(first.shuffle, again.shuffle)
        assert len(list(tmp_path.glob("d_train_*.npy"))) == 3
        for changed in ({"seq": 8}, {"seed": 2}, {"samples": 60}):
            caplog.clear()
            GPTDataset("train", str(tmp_path / "d"), (0, 40), changed.get("seq", SEQ), changed.get("samples", 50),
                       seed=changed.get("seed", 1))
            assert "built the train sample index" in caplog.text, changed
    assert len(list(tmp_path.glob("d_train_*.npy"))) == 12
    assert not list(tmp_path.glob("*.tmp*"))


def test_split_ranges_follow_megatron():
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("90,10", 10) == [(0, 9), (9, 10), (10, 10)]
    assert split_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]  # rounding remainder shifts every boundary


def test_blending_follows_the_weights_at_every_prefix(tmp_path):
    parts = []
    for i in range(3):
        write_dataset(tmp_path / f"d{i}", n_docs=60, seed=i, offset=i * 1000)
        parts.append(GPTDataset("train", str(tmp_path / f"d{i}"), (0, 60), SEQ, 2000, seed=i))
    blended = BlendedDataset(parts, [0.5, 0.3, 0.2], 3000)
    for n in (100, 1000, 3000):
        counts = np.bincount(blended.dataset_index[:n], minlength=3) / n
        assert np.abs(counts - [0.5, 0.3, 0.2]).max() <= 0.01, (n, counts)
    assert blended[1].max() < 1000 or blended[1].min() >= 1000  # samples come whole from one dataset
    assert len(set(zip(blended.dataset_index, blended.sample_index, strict=True))) == 3000  # no sample repeats


def test_sampler_resumes_from_consumed_samples_without_skipping():
    full = [batch for rank in range(2) for batch in PretrainingSampler(100, 0, 4, rank, 2)]
    straight = list(PretrainingSampler(100, 0, 4, 1, 2))
    resumed = list(PretrainingSampler(100, 40, 4, 1, 2))
    assert resumed == straight[5:]  # 40 samples = 5 steps of 8
    assert sorted(i for b in full for i in b) == list(range(96))  # ranks split each step, nothing shared


def test_build_datasets_and_loaders_from_the_config(tmp_path, write_yaml):
    write_dataset(tmp_path / "d", n_docs=100)
    cfg = load_config([write_yaml("c.yml", "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
                                  "intermediate_size: 128\nvocab_size: 1100\n")],
                      [f"seq_length={SEQ}", f"data_path={tmp_path / 'd'}", "split=80,10,10", "train_iters=10",
                       "train_micro_batch_size_per_gpu=2", "eval_interval=5", "eval_iters=2", "num_workers=0"],
                      world_size=2)
    sets = build_datasets(cfg)
    assert len(sets["train"]) == 10 * 4 and len(sets["valid"]) == 3 * 2 * 4 and len(sets["test"]) == 2 * 4
    assert set(np.asarray(sets["valid"].doc_order)) == set(range(80, 90))
    loaders = [build_loader(sets["train"], cfg, rank, 2, consumed_samples=8) for rank in range(2)]
    first = [next(iter(loader)) for loader in loaders]
    assert first[0]["input_ids"].shape == (2, SEQ)
    expected = np.stack([sets["train"][i] for i in (8, 9)])
    assert np.array_equal(first[0]["input_ids"].numpy(), expected[:, :-1])
    assert np.array_equal(first[1]["labels"].numpy(), np.stack([sets["train"][i] for i in (10, 11)])[:, 1:])


def test_blended_paths_with_weights_from_the_config(tmp_path, write_yaml):
    for i in range(2):
        write_dataset(tmp_path / f"d{i}", n_docs=80, seed=i, offset=i * 1000)
    cfg = load_config([write_yaml("c.yml", "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
                                  "intermediate_size: 128\nvocab_size: 2100\n")],
                      [f"seq_length={SEQ}", f"train_data_paths=[{tmp_path / 'd0'}, {tmp_path / 'd1'}]",
                       "train_data_weights=[3.0, 1.0]", "train_iters=100", "train_micro_batch_size_per_gpu=4"])
    train = build_datasets(cfg)["train"]
    share = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert len(train) == 400 and abs(share[0] - 0.75) <= 0.01


def test_too_little_data_is_a_clear_error(tmp_path):
    with IndexedDatasetWriter(tmp_path / "small", np.uint16) as w:
        w.add_document([1, 2, 3])
    with pytest.raises(DataError, match="at least seq_length \\+ 1 = 17 are needed"):
        GPTDataset("train", str(tmp_path / "small"), (0, 1), SEQ, 10, seed=0, dataset=IndexedDataset(tmp_path / "small"))


def test_sample_index_covers_one_epoch_exactly():
    sizes = np.random.RandomState(0).randint(1, 400, size=20_000)  # benchmarks/dataloader.py times 1e8 tokens
    order, starts, shuffle = build_sample_index(sizes, 64, None, seed=0)
    assert len(shuffle) == (sizes.sum() - 1) // 64 and starts.shape == (len(shuffle) + 1, 2)
    ends = np.cumsum(sizes[order])
    begin = ends[starts[:, 0]] - sizes[order][starts[:, 0]] + starts[:, 1]
    assert np.array_equal(begin, np.arange(len(shuffle) + 1) * 64)


def _three_documents(tmp_path, write_yaml, *overrides):
    with IndexedDatasetWriter(tmp_path / "three", np.uint16) as w:
        for i in range(3):
            w.add_document(np.arange(40) + i)
    return load_config([write_yaml("c.yml", "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
                                   "intermediate_size: 128\nvocab_size: 100\n")],
                       [f"seq_length={SEQ}", f"data_path={tmp_path / 'three'}", "train_iters=4", "num_workers=0",
                        *overrides])


def test_an_empty_split_the_run_reads_is_one_warning(tmp_path, write_yaml, caplog):
    cfg = _three_documents(tmp_path, write_yaml, "split=90,5,5", "eval_interval=2", "eval_iters=1")
    with caplog.at_level(logging.WARNING, logger="neox_llama.data.loader"):
        sets = build_datasets(cfg)
    assert set(sets) == {"train"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for part in ('split: "90,5,5"', "over the 3 document(s)", "validation and test splits with 0 documents",
                 "will not validate (eval_interval 2, eval_iters 1)"):
        assert part in warnings[0], warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neox_llama.data.loader"):
        build_datasets(cfg, announce=False)  # ranks other than 0 say nothing
        build_datasets(_three_documents(tmp_path, write_yaml, "split=90,5,5", "eval_iters=0"))  # nothing to read
        build_datasets(_three_documents(tmp_path, write_yaml, "split=34,33,33", "eval_iters=1"))  # a document each
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_split_that_leaves_training_empty_is_an_error(tmp_path, write_yaml):
    cfg = _three_documents(tmp_path, write_yaml, "split=0,50,50")
    assert split_ranges("0,50,50", 3) == [(0, 0), (0, 1), (1, 3)]  # Megatron's rounding, never below zero
    with pytest.raises(DataError) as err:
        build_datasets(cfg)
    assert str(err.value) == (
        f'command line: split: "0,50,50" over the 3 document(s) of {tmp_path / "three"} leaves the training split '
        'empty (training 0, validation 1, test 2 documents); give training a share that holds at least one document '
        '(e.g. split: "969,30,1") or add documents')
