"""Packed GPT samples: documents concatenated in a seeded order, cut into ``seq_length + 1`` token samples.

Three index arrays describe an epoch-repeating, shuffled view of the documents of one split:
- ``doc_order``: document ids in reading order (a fresh seeded permutation per epoch),
- ``sample_starts``: for sample k, (position in doc_order, token offset) where it starts; sample k ends
  where sample k + 1 starts, plus one token (the last label),
- ``shuffle``: a seeded permutation of samples.
They are built with vectorised numpy (cumsum + searchsorted) once, on rank 0, and cached as ``.npy``
beside the data under a name keyed by every parameter that shapes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from neox_llama.data.indexed import IndexedDataset
from neox_llama.distributed import agree
from neox_llama.errors import NeoxLlamaError

logger = logging.getLogger(__name__)


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges of train/valid/test for a ``split`` string like ``969,30,1`` (Megatron's rule)."""
    weights = [float(x) for x in split.replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * num_documents)))  # noqa: RUF046 (numpy floats)
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    for i in range(1, 4):  # a split given no document ("0,50,50" over 3) must not reach below the one before it
        bounds[i] = max(bounds[i], bounds[i - 1])
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def build_sample_index(doc_sizes: np.ndarray, seq_length: int, num_samples: int | None, seed: int):
    """(doc_order, sample_starts, shuffle) covering ``num_samples`` samples (None = one epoch's worth)."""
    doc_sizes = np.asarray(doc_sizes, dtype=np.int64)
    tokens_per_epoch = int(doc_sizes.sum())
    if tokens_per_epoch <= seq_length:
        raise DataError(f"the split has {tokens_per_epoch} tokens; at least seq_length + 1 = {seq_length + 1} are needed")
    wanted = num_samples if num_samples is not None else (tokens_per_epoch - 1) // seq_length
    epochs = max(1, math.ceil((wanted * seq_length + 1) / tokens_per_epoch))
    rng = np.random.RandomState(seed % 2**32)
    order = np.concatenate([rng.permutation(len(doc_sizes)) for _ in range(epochs)]).astype(np.int64)
    lengths = doc_sizes[order]
    ends = np.cumsum(lengths)
    available = (int(ends[-1]) - 1) // seq_length
    count = min(wanted, available)
    positions = np.arange(count + 1, dtype=np.int64) * seq_length
    doc_pos = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[doc_pos] - lengths[doc_pos])
    starts = np.stack([doc_pos, offsets], axis=1)
    shuffle = rng.permutation(count).astype(np.int64)
    return order, starts, shuffle


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class DataError(NeoxLlamaError):
    """The data cannot provide what the run needs (too few tokens, an empty split); the message says what."""


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens from documents ``[first, last)`` of an indexed dataset."""

    def __init__(self, name: str, prefix: str, documents: tuple[int, int], seq_length: int,
                 num_samples: int | None, seed: int, dataset: IndexedDataset | None = None):
        self.name, self.prefix, self.seq_length = name, str(prefix), seq_length
        self.data = dataset or IndexedDataset(prefix)
        self.first, self.last = documents
        if self.last <= self.first:
            raise DataError(f"{prefix}: the {name} split has no documents; change `split` or add documents")
        self.doc_order, self.sample_starts, self.shuffle = self._load_or_build(num_samples, seed)

    def _cache_paths(self, num_samples: int | None, seed: int) -> dict[str, Path]:
        idx = Path(f"{self.prefix}.idx")
        stat = idx.stat()
        key = json.dumps({"documents": [self.first, self.last], "seq_length": self.seq_length, "num_samples": num_samples,
                          "seed": seed, "idx_size": stat.st_size, "idx_mtime_ns": stat.st_mtime_ns, "version": 1})
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return {part: Path(f"{self.prefix}_{self.name}_{digest}_{part}.npy") for part in ("doc", "sample", "shuffle")}

    def _load_or_build(self, num_samples: int | None, seed: int):
        paths = self._cache_paths(num_samples, seed)

        def build() -> None:
            if all(p.exists() for p in paths.values()):
                return
            start = time.perf_counter()
            sizes = self.data.sizes[self.first:self.last]
            order, starts, shuffle = build_sample_index(sizes, self.seq_length, num_samples, seed)
            order += self.first
            for part, array in (("doc", order), ("sample", starts), ("shuffle", shuffle)):
                _atomic_save(paths[part], array)
            logger.info("%s: built the %s sample index (%d samples) in %.2f s", self.prefix, self.name,
                        len(shuffle), time.perf_counter() - start)

        # One builder per node (the cache sits beside the data, which every node has; on a shared filesystem
        # the writes are atomic and identical); every rank learns the builders' outcome instead of waiting.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            agree(build)
        else:
            agree(lambda: None)
        return tuple(np.load(paths[part], mmap_mode="r") for part in ("doc", "sample", "shuffle"))

    def __len__(self) -> int:
        return len(self.shuffle)

    def read(self, data: IndexedDataset, index: int) -> np.ndarray:
        """Sample ``index``'s ``seq_length + 1`` values of ``data`` (the tokens, or a parallel label dataset)."""
        k = int(self.shuffle[index])
        (d0, o0), (d1, o1) = self.sample_starts[k], self.sample_starts[k + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        if d0 == d1:
            values = data.get(int(self.doc_order[d0]), o0, o1 - o0 + 1)
        else:
            parts = [data.get(int(self.doc_order[d0]), o0)]
            parts += [data.get(int(self.doc_order[d])) for d in range(d0 + 1, d1)]
            parts.append(data.get(int(self.doc_order[d1]), 0, o1 + 1))
            values = np.concatenate(parts)
        return values.astype(np.int64)

    def __getitem__(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``index`` (int64)."""
        return self.read(self.data, index)


class LabeledGPTDataset:
    """A token dataset and its parallel label dataset (GPT-NeoX's ``*_label_document``: the label of every token,
    -100 where there is no loss), read through the same sample index. Samples are [2, seq_length + 1] arrays:
    tokens, then labels."""

    def __init__(self, tokens: GPTDataset, label_prefix: str):
        self.tokens = tokens
        self.labels = IndexedDataset(label_prefix)
        docs = tokens.data.sizes
        if len(self.labels.sizes) != len(docs) or not np.array_equal(self.labels.sizes, docs):
            raise DataError(f"{label_prefix}: its documents do not match {tokens.prefix}'s ({len(self.labels.sizes)} vs "
                            f"{len(docs)} documents, or different lengths); a label dataset must be made with its "
                            "token dataset (tools/preprocess_data.py --instruction)")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.stack([self.tokens.read(self.tokens.data, index), self.tokens.read(self.labels, index)])


class BlendedDataset:
    """Several datasets interleaved so that every prefix of samples follows the weights to within one sample.

    Sample j of dataset d is placed at time (j + 1/2) / w_d; samples are read in time order.
    """

    def __init__(self, datasets: list, weights: list[float], size: int):
        total = float(sum(weights))
        norm = np.asarray(weights, dtype=np.float64) / total
        times, which, local = [], [], []
        for d, w in enumerate(norm):
            n = min(len(datasets[d]), math.ceil(w * size) + 1)
            j = np.arange(n)
            times.append((j + 0.5) / w)
            which.append(np.full(n, d))
            local.append(j)
        order = np.argsort(np.concatenate(times), kind="stable")[:size]
        self.dataset_index = np.concatenate(which)[order]
        self.sample_index = np.concatenate(local)[order]
        self.datasets = datasets
        if len(order) < size:
            raise DataError(f"the blended datasets hold {len(order)} samples, {size} requested")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[index])][int(self.sample_index[index])]


def blend_sizes(weights: list[float], size: int) -> list[int]:
    """Samples to request from each blended dataset (0.5% headroom, as Megatron)."""
    total = float(sum(weights))
    return [math.ceil(w / total * size * 1.005) + 1 for w in weights]
