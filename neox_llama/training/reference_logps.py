"""``preference_reference: precomputed``: every pair's reference log-probabilities computed once before training.

Each data-parallel rank scores its share of a split's pairs (every ``dp``-th pair) with the reference — the base with
the adapters switched off (LoRA, Adapter) or the starting weights (full fine-tuning: the policy itself before its
first step, else a temporary frozen copy placed like the policy, released after) — in micro-batches of the run's
size, in the same forward (:func:`~neox_llama.training.preference.reference_logps`) a ``model`` reference runs in
each step. The ranks' shares are summed over the data-parallel group, and the first rank writes them beside the
data, ``.<file>.<key>-<split>.reference.npy``, keyed by the base's fingerprint, the tokenised pairs (so the file, the
template, the tokenizer and the truncation), the true vocabulary and the precision; a later run (a resume, another
layout) reads them back. The datasets then carry them as TRL's ``ref_chosen_logps`` / ``ref_rejected_logps``
columns are carried, and training holds no reference model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from neox_llama.config.schema import Config
from neox_llama.data.preference import PreferenceDataset
from neox_llama.distributed import agree
from neox_llama.errors import TrainingError
from neox_llama.training.engine import TrainingEngine
from neox_llama.training.preference import PreferenceObjective, reference_logps

logger = logging.getLogger("train")


def reference_key(dataset: PreferenceDataset, fingerprint: str, true_vocab: int, precision: str,
                  model: str = "") -> str:
    """What the values depend on: the base, the model's arguments (``model``: e.g. a fine-tune's rope scaling), the
    pairs' ids, the vocabulary scored over and the precision."""
    digest = hashlib.sha1(f"{fingerprint}|{true_vocab}|{precision}|{model}|v1".encode())
    for example in dataset.examples:
        for part in (example.prompt, example.chosen, example.rejected):
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:16]


def reference_file(data_path: str | Path, key: str) -> Path:
    path = Path(data_path)
    return path.with_name(f".{path.name}.{key}.reference.npy")


def _read(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as err:
        raise TrainingError(f"{path}: unreadable reference log-probabilities ({err}); delete it to compute them "
                            "again") from None


def compute(dataset: PreferenceDataset, objective: PreferenceObjective, training_engine: TrainingEngine,
            micro_batch: int, device: torch.device) -> np.ndarray:
    """[pairs, 2] reference log-probabilities (chosen, rejected) of ``dataset``'s examples, this rank scoring every
    ``dp``-th pair; summed over the data-parallel group (every rank returns the whole array). Every rank runs the
    same number of forwards (ZeRO-3 gathers and tensor-parallel reductions are collective): a short last share
    repeats its last pair, counted once."""
    state = training_engine.state
    count = len(dataset.examples)
    mine = list(range(state.dp_rank, count, state.dp_size))
    steps = math.ceil(math.ceil(count / state.dp_size) / micro_batch)
    values = torch.zeros(count, 2, dtype=torch.float64, device=device)
    for step in tqdm(range(steps), desc=f"reference log-probabilities ({dataset.name})", disable=state.dp_rank != 0,
                     leave=False):
        chunk = mine[step * micro_batch:(step + 1) * micro_batch]
        indices = chunk or mine[-1:] or [0]
        batch = {k: v.to(device) for k, v in dataset.collate([dataset.sample(i) for i in indices]).items()}
        logps = reference_logps(batch, objective, training_engine).double()
        chosen, rejected = logps.chunk(2)
        for row, index in enumerate(chunk):
            values[index, 0], values[index, 1] = chosen[row], rejected[row]
    dist.all_reduce(values, group=state.dp_group)
    return values.cpu().numpy()


def attach_reference_logps(cfg: Config, datasets: dict, objective: PreferenceObjective,
                           training_engine: TrainingEngine, fingerprint: str, device: torch.device, rank: int,
                           scorer: Callable[[], PreferenceObjective]) -> None:
    """Give every split of ``datasets`` its reference log-probabilities: read from beside the data, or computed
    (``scorer()``: the objective whose reference scores them, built only when some split needs it) and written
    there by global rank 0."""
    sources = {"train": cfg.preference_data_path, "valid": cfg.preference_valid_data_path or cfg.preference_data_path}
    computing: PreferenceObjective | None = None
    for name, dataset in datasets.items():
        model = repr(sorted(dataclasses.asdict(training_engine.args).items()))
        path = reference_file(sources[name], reference_key(dataset, fingerprint, objective.true_vocab,
                                                           cfg.precision, model) + f"-{name}")
        present = agree(lambda p=path: p.is_file(), same_result=f"whether {path} exists")
        if present:
            values = agree(lambda p=path: _read(p))
            if values.shape != (len(dataset.examples), 2):
                raise TrainingError(f"{path}: holds {values.shape[0]} pairs' reference log-probabilities, the "
                                 f"{name} split has {len(dataset.examples)}; delete it to compute them again")
            logger.info("preference reference log-probabilities of the %s split (%d pairs) read from %s", name,
                        len(values), path)
        else:
            computing = computing or scorer()
            values = compute(dataset, computing, training_engine, cfg.train_micro_batch_size_per_gpu, device)
            if rank == 0:
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
                try:
                    np.save(tmp, values)
                    os.replace(tmp, path)
                except OSError as err:  # a read-only data folder: computed again by the next run
                    tmp.unlink(missing_ok=True)
                    logger.warning("%s: cannot keep the reference log-probabilities beside the data (%s)", path, err)
            logger.info("preference reference log-probabilities of the %s split (%d pairs) computed by %s and "
                        "written to %s", name, len(values), "the base with its adapters off"
                        if not objective.full else "the starting weights", path)
        dataset.reference = values
