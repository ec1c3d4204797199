"""From a config to per-rank data loaders of training batches (packed samples, splits, blending, resume)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from neox_llama.config.schema import Config
from neox_llama.data.gpt_dataset import (
    BlendedDataset,
    DataError,
    GPTDataset,
    LabeledGPTDataset,
    blend_sizes,
    split_ranges,
)
from neox_llama.data.indexed import IndexedDataset

SPLITS = ("train", "valid", "test")
SPLIT_NAMES = {"train": "training", "valid": "validation", "test": "test"}

logger = logging.getLogger(__name__)


class PretrainingSampler:
    """Micro-batches of sample indices for one data-parallel rank, starting at ``consumed_samples``.

    Global step g uses samples [consumed + g*B, consumed + (g+1)*B) of the dataset (B = micro x dp per
    micro-step); rank r takes its contiguous slice. Resuming needs only the consumed count: nothing is skipped
    through or re-read.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if consumed_samples > total_samples:
            raise DataError(f"consumed_samples {consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))


@dataclass
class BatchMaker:
    """Turns ``seq_length + 1`` token samples into a training batch (inputs, labels, loss mask, positions)."""

    eod_id: int | None = None
    reset_position_ids: bool = False
    eod_mask_loss: bool = False

    def __call__(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack(samples))
        given = None
        if tokens.ndim == 3:  # [tokens; labels] from a label dataset: GPT-NeoX's rule, loss where label >= 0
            tokens, given = tokens[:, 0], tokens[:, 1, 1:]
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        batch, seq = inputs.shape
        loss_mask = torch.ones(batch, seq, dtype=torch.float32)
        if given is not None:
            loss_mask = (given >= 0).float()
            labels = torch.where(given >= 0, given, torch.zeros_like(given)).contiguous()
        position_ids = torch.arange(seq).expand(batch, seq).contiguous()
        if self.eod_id is not None and (self.reset_position_ids or self.eod_mask_loss):
            is_eod = inputs == self.eod_id
            if self.eod_mask_loss:
                loss_mask[is_eod] = 0.0
            if self.reset_position_ids:
                # position = distance to the most recent token after an end-of-document (vectorised)
                after_eod = torch.zeros_like(is_eod)
                after_eod[:, 1:] = is_eod[:, :-1]
                starts = torch.where(after_eod, position_ids, torch.zeros_like(position_ids))
                position_ids = position_ids - torch.cummax(starts, dim=1).values
        return {"input_ids": inputs, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def split_sample_counts(cfg: Config, start: tuple[int, int] = (0, 0)) -> dict[str, int]:
    """Samples each split must provide for the whole run; ``start``: the (step, consumed samples) a resumed run
    starts at (a checkpoint trained with another global batch consumed more or fewer than step x batch)."""
    batch = cfg.derived.train_batch_size
    evals = cfg.train_iters // cfg.eval_interval + 1
    step, consumed = start
    train = max(cfg.train_iters * batch, consumed + max(cfg.train_iters - step, 0) * batch)
    return {"train": train, "valid": evals * cfg.eval_iters * batch, "test": cfg.eval_iters * batch}


def _blend(name: str, prefixes: list[str], weights: list[float], size: int, cfg: Config, labels: list[str]):
    datasets_raw = [IndexedDataset(p) for p in prefixes]
    weights = weights or [float(ds.num_tokens) for ds in datasets_raw]

    def part(i: int, samples: int, seed: int):
        dataset = GPTDataset(name, prefixes[i], (0, len(datasets_raw[i])), cfg.seq_length, samples, seed, datasets_raw[i])
        return LabeledGPTDataset(dataset, labels[i]) if labels else dataset

    if len(prefixes) == 1:
        return part(0, size, cfg.seed)
    parts = [part(i, n, cfg.seed + i) for i, n in enumerate(blend_sizes(weights, size))]
    return BlendedDataset(parts, weights, size)


def split_documents(cfg: Config, num_documents: int) -> list[tuple[int, int]]:
    """The document ranges of train/valid/test that ``split`` gives ``data_path``'s ``num_documents``; a split that
    leaves training without a document is an error naming the ``split`` value and what each split got."""
    ranges = split_ranges(cfg.split, num_documents)
    if ranges[0][1] <= ranges[0][0]:
        got = ", ".join(f"{SPLIT_NAMES[n]} {last - first}" for n, (first, last) in zip(SPLITS, ranges, strict=True))
        raise DataError(f"{cfg.sources.get('split', 'default')}: split: \"{cfg.split}\" over the {num_documents} "
                        f"document(s) of {cfg.data_path} leaves the training split empty ({got} documents); give "
                        "training a share that holds at least one document (e.g. split: \"969,30,1\") or add documents")
    return ranges


def empty_split_warning(cfg: Config, ranges: list[tuple[int, int]], num_documents: int) -> str | None:
    """One line naming every split the run would read (validation and test, with ``eval_iters`` > 0) that ``split``
    leaves without a document; None when there is none."""
    counts = split_sample_counts(cfg)
    empty = [SPLIT_NAMES[n] for n, (first, last) in zip(SPLITS, ranges, strict=True)
             if n != "train" and counts[n] > 0 and last <= first]
    if not empty:
        return None
    skipped = {"validation": f"validate (eval_interval {cfg.eval_interval}, eval_iters {cfg.eval_iters})",
               "test": "report a test loss at the end"}
    return (f"split: \"{cfg.split}\" ({cfg.sources.get('split', 'default')}) over the {num_documents} document(s) of "
            f"{cfg.data_path} leaves the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} with 0 documents: "
            f"this run will not {' nor '.join(skipped[e] for e in empty)}; give {'them' if len(empty) > 1 else 'it'} "
            "a larger share of split or add documents (eval_iters: 0 turns evaluation off)")


def build_datasets(cfg: Config, announce: bool = True, start: tuple[int, int] = (0, 0)) -> dict[str, object]:
    """train/valid/test datasets from ``data_path`` + ``split``, or from the ``*_data_paths`` lists (``start``: a
    resumed run's step and consumed samples, :func:`split_sample_counts`).

    With ``data_path``, a ``split`` that leaves training without a document is an error, and one that leaves a split
    the run reads (validation, test) empty is said once in a warning (where ``announce``: rank 0)."""
    counts = split_sample_counts(cfg, start)
    out: dict[str, object] = {}
    if cfg.data_path:
        data = IndexedDataset(cfg.data_path)
        ranges = split_documents(cfg, len(data))
        warning = empty_split_warning(cfg, ranges, len(data)) if announce else None
        if warning:
            logger.warning("%s", warning)
        for name, docs in zip(SPLITS, ranges, strict=True):
            if docs[1] > docs[0] and counts[name] > 0:
                out[name] = GPTDataset(name, cfg.data_path, docs, cfg.seq_length, counts[name], cfg.seed, data)
        return out
    for name in SPLITS:
        paths, weights = getattr(cfg, f"{name}_data_paths"), getattr(cfg, f"{name}_data_weights")
        labels = getattr(cfg, f"{name}_label_data_paths")
        if paths and counts[name] > 0:
            out[name] = _blend(name, paths, weights, counts[name], cfg, labels)
    return out


def build_loader(dataset, cfg: Config, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 eod_id: int | None = None) -> DataLoader:
    """A loader of this rank's micro-batches, resuming after ``consumed_samples`` (global count)."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, cfg.derived.train_micro_batch_size_per_gpu,
                                 dp_rank, dp_size)
    # Instruction samples carry their own masks and positions; token samples are cut into a batch here.
    maker = getattr(dataset, "collate", None) or BatchMaker(eod_id, cfg.reset_position_ids, cfg.eod_mask_loss)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=maker, num_workers=cfg.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
