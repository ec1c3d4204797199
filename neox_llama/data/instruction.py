"""Instruction data for fine-tuning: JSON or JSONL records -> token ids with a response mask -> training samples.

Records are Alpaca records (``instruction``, optional ``input``, ``output``) or chat records
(``messages: [{role, content}, ...]``, roles system/user/assistant, multi-turn). Every record is checked
before training starts; a bad one is an error naming the file and the record index.

A record becomes ids through its prompt style (:mod:`neox_llama.tokenizers.prompts`, shared with generation)
and is cut to ``seq_length + 1`` tokens: the prompt is cut from the left (BOS kept), then the response from
the right, always keeping at least one response token; records with no response token left are dropped.
Samples are one record each, padded (``sft_packing: false``; padding carries no loss, so it does not change
it), or whole records packed into ``seq_length + 1`` tokens with positions restarting at every record, which
the model reads as document boundaries (attention stays inside a record). Each epoch reads the records in a
fresh order drawn from the seed and the epoch number, and epochs repeat until the run has its samples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neox_llama.data.gpt_dataset import DataError
from neox_llama.distributed import agree
from neox_llama.tokenizers.base import Tokenizer, TokenizerError
from neox_llama.tokenizers.prompts import Message, check_conversation, check_style, default_chat_style, encode_dialog
from neox_llama.tokenizers.text import undecodable_reason, unencodable_reason

logger = logging.getLogger(__name__)

IGNORE = -100
"""The label of a position without loss (GPT-NeoX's and Hugging Face's convention)."""


class InstructionDataError(DataError):
    """An instruction file or record is malformed; the message names the file and the record index."""


# --------------------------------------------------------------------------- records
def _parse_file(path: Path, encoding: str) -> list:
    try:
        text = path.read_text(encoding=encoding, errors="surrogateescape")
    except (OSError, UnicodeDecodeError) as err:
        raise InstructionDataError(f"{path}: cannot read it ({err})") from None
    bad = undecodable_reason(text, encoding, first_line=1)
    if bad:
        raise InstructionDataError(f"{path}: {bad}; instruction data must be {encoding} text (preprocess_data.py "
                                   "--instruction reads other encodings with --encoding)")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InstructionDataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        return data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InstructionDataError(f"{path}: line {number} is not valid JSON ({err.msg}); a JSONL file holds one "
                                       "record per line, a JSON file one list of records") from None
    return records


def _check_text(text: str, where: str) -> None:
    """Text no tokenizer can encode (a lone surrogate such as JSON's "\\ud800") is a malformed record."""
    bad = unencodable_reason(text)
    if bad:
        raise InstructionDataError(f"{where} holds {bad}")


def _record_messages(record: object, where: str) -> list[Message]:
    if not isinstance(record, dict):
        raise InstructionDataError(f"{where}: a record must be an object, not {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InstructionDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InstructionDataError(f"{where}: messages[{i}] must be an object with role and content")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    found = "missing" if key not in message else f"a {type(message[key]).__name__}"
                    raise InstructionDataError(f"{where}: messages[{i}].{key} is {found}; it must be a string")
            if message["role"] not in ("system", "user", "assistant"):
                raise InstructionDataError(f"{where}: messages[{i}].role {message['role']!r} is unknown; valid roles "
                                           "are system, user, assistant")
            _check_text(message["content"], f"{where}: messages[{i}].content")
            out.append(Message(message["role"], message["content"]))
        problem = check_conversation(out, open_turn=False)
        if problem:
            raise InstructionDataError(f"{where}: {problem}")
        return out
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            found = "missing" if key not in record else f"a {type(record[key]).__name__}"
            raise InstructionDataError(f"{where}: field {key!r} is {found}; an Alpaca record needs string fields "
                                       "instruction and output (and optionally input), a chat record a 'messages' list")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise InstructionDataError(f"{where}: field 'input' is a {type(extra).__name__}; it must be a string")
    for key in ("instruction", "input", "output"):
        _check_text(record.get(key) or "", f"{where}: field {key!r}")
    return [Message("user", record["instruction"], extra or None), Message("assistant", record["output"])]


def load_records(path: str | Path, encoding: str = "utf-8") -> tuple[list[list[Message]], bool]:
    """Every record of ``path`` (``encoding`` text) as a conversation, and whether any was a chat record."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"{path}: instruction data file not found")
    data = _parse_file(path, encoding)
    if not isinstance(data, list):
        raise InstructionDataError(f"{path}: the JSON must be a list of records")
    if not data:
        raise InstructionDataError(f"{path}: holds no records")
    chat = any(isinstance(r, dict) and "messages" in r for r in data)
    return [_record_messages(r, f"{path}: record {i}") for i, r in enumerate(data)], chat


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) drawn with ``seed``: round(fraction x n) validation records, at least one when the
    fraction is positive and there are two or more records, and at least one training record."""
    n = len(records)
    if fraction <= 0 or n < 2:
        return list(records), []
    count = min(max(1, round(fraction * n)), n - 1)
    order = np.random.RandomState(seed % 2**32).permutation(n)
    valid = set(order[:count].tolist())
    return [r for i, r in enumerate(records) if i not in valid], [r for i, r in enumerate(records) if i in valid]


def resolve_style(style: str | None, chat: bool, tokenizer: Tokenizer) -> str:
    """The style to use: ``style`` when set, else alpaca for Alpaca records and the family's chat style for chat."""
    chosen = style or (default_chat_style(tokenizer) if chat else "alpaca")
    check_style(chosen, tokenizer)
    return chosen


# --------------------------------------------------------------------------- tokens
@dataclass
class Example:
    """One record as ids and per-id response mask (an id's mask says whether predicting it carries loss)."""

    ids: np.ndarray
    trained: np.ndarray


def truncate(ids: list[int], trained: list[bool], limit: int, keep_first: bool) -> tuple[list[int], list[bool]] | None:
    """Cut to ``limit`` ids: the prompt from the left (keeping the first id when ``keep_first``, e.g. BOS), then
    the response from the right, keeping at least one id of context; None when no response id is left."""
    if len(ids) > limit:
        first_response = next((i for i, t in enumerate(trained) if t), len(ids))
        head = 1 if keep_first else 0
        removable = max(0, first_response - head - 1)  # keep one prompt id before the response
        cut = min(len(ids) - limit, removable)
        ids, trained = ids[:head] + ids[head + cut:], trained[:head] + trained[head + cut:]
        ids, trained = ids[:limit], trained[:limit]
    if not any(trained[1:]):
        return None
    return ids, trained


def tokenize(records: list[list[Message]], tokenizer: Tokenizer, style: str, seq_length: int,
             mask_prompt: bool, where: str, allow_empty: bool = False) -> list[Example]:
    """Examples of ``records``; logs how many were truncated and dropped (none left: an error unless
    ``allow_empty``)."""
    examples, truncated, dropped = [], 0, 0
    for index, messages in enumerate(records):
        try:
            ids, trained = encode_dialog(tokenizer, style, messages, open_turn=False)
        except TokenizerError as err:
            raise InstructionDataError(f"{where}: record {index}: {err}") from None
        trained[0] = False  # nothing predicts a record's first id (in packed samples: the previous record)
        # Truncate by the real prompt/response boundary, then widen the loss to the prompt if asked.
        cut = truncate(ids, trained, seq_length + 1, keep_first=ids[0] == tokenizer.bos_id)
        if cut is None:
            dropped += 1
            continue
        kept, mask = cut
        if not mask_prompt:
            mask = [False] + [True] * (len(kept) - 1)
        truncated += len(kept) < len(ids)
        examples.append(Example(np.asarray(kept, dtype=np.int32), np.asarray(mask, dtype=np.bool_)))
    if truncated or dropped:
        logger.info("%s: %d of %d records truncated to seq_length + 1 = %d tokens, %d dropped (no response "
                    "token left)", where, truncated, len(records), seq_length + 1, dropped)
    if not examples and not allow_empty:
        raise InstructionDataError(f"{where}: no record has a response token within seq_length {seq_length}")
    return examples


def _cache_path(path: Path, key: dict) -> Path:
    stat = path.stat()
    key = dict(key, size=stat.st_size, mtime_ns=stat.st_mtime_ns, version=1)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return path.with_name(f".{path.name}.{digest}.tokens.npz")


def _tokenizer_digest(tokenizer: Tokenizer) -> str:
    digest = hashlib.sha1(tokenizer.name.encode())
    for file in tokenizer.files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def cached_examples(path: Path, records: list[list[Message]], name: str, tokenizer: Tokenizer, style: str,
                    seq_length: int, mask_prompt: bool, seed: int, fraction: float,
                    allow_empty: bool = False) -> list[Example]:
    """Tokenise ``records`` once (one builder per node) and keep them beside ``path``, keyed by everything that
    shapes them (file, tokenizer files, style, masking, length, split)."""
    cache = _cache_path(path, {"tokenizer": _tokenizer_digest(tokenizer), "style": style, "mask": mask_prompt,
                               "seq": seq_length, "split": name, "seed": seed, "fraction": fraction})

    def build() -> None:
        if cache.exists():
            return
        examples = tokenize(records, tokenizer, style, seq_length, mask_prompt, f"{path} ({name})", allow_empty)
        lengths = np.asarray([len(e.ids) for e in examples], dtype=np.int64)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, ids=np.concatenate([e.ids for e in examples] or [np.zeros(0, np.int32)]),
                     trained=np.concatenate([e.trained for e in examples] or [np.zeros(0, np.bool_)]), lengths=lengths)
            os.replace(tmp, cache)
        except OSError as err:  # e.g. a read-only data folder: every rank tokenises for itself instead
            tmp.unlink(missing_ok=True)
            logger.warning("%s: cannot cache the tokenised records beside it (%s); tokenising them on every rank",
                           path, err)

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        agree(build)
    else:
        agree(lambda: None)
    if not cache.exists():
        return tokenize(records, tokenizer, style, seq_length, mask_prompt, f"{path} ({name})", allow_empty)
    with np.load(cache) as data:
        ids, trained, lengths = data["ids"], data["trained"], data["lengths"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [Example(ids[a:b], trained[a:b]) for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------- samples
class InstructionDataset:
    """``num_samples`` training samples of ``seq_length + 1`` ids from ``examples``, epoch after epoch.

    Each sample is a dict of ``tokens``, ``trained`` (loss on predicting that id) and ``positions``.
    """

    def __init__(self, name: str, examples: list[Example], seq_length: int, num_samples: int, seed: int,
                 packing: bool, pad_id: int):
        self.name, self.examples, self.length = name, examples, seq_length + 1
        self.seed, self.packing, self.pad_id = seed, packing, pad_id
        self.epoch_starts: list[int] = [0]  # sample index where each epoch starts
        self.packs: list[list[int]] = []  # example indices of each sample, epoch after epoch
        epoch = 0
        while len(self.packs) < num_samples:
            order = np.random.RandomState((seed + 7919 * epoch) % 2**32).permutation(len(examples)).tolist()
            self.packs += self._pack(order) if packing else [[i] for i in order]
            self.epoch_starts.append(len(self.packs))
            epoch += 1
        del self.packs[num_samples:]

    def _pack(self, order: list[int]) -> list[list[int]]:
        packs, current, used = [], [], 0
        for index in order:
            size = len(self.examples[index].ids)
            if current and used + size > self.length:
                packs.append(current)
                current, used = [], 0
            current.append(index)
            used += size
        if current:
            packs.append(current)
        return packs

    def __len__(self) -> int:
        return len(self.packs)

    def epoch_of(self, sample: int) -> int:
        """The epoch (from 1) that sample index ``sample`` belongs to."""
        return int(np.searchsorted(self.epoch_starts, sample, side="right"))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        tokens = np.full(self.length, self.pad_id, dtype=np.int64)
        trained = np.zeros(self.length, dtype=np.bool_)
        positions = np.zeros(self.length, dtype=np.int64)
        at = 0
        for example_index in self.packs[index]:
            example = self.examples[example_index]
            n = len(example.ids)
            tokens[at:at + n], trained[at:at + n] = example.ids, example.trained
            positions[at:at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(self.length - at)  # padding: a document of its own, without loss
        return {"tokens": tokens, "trained": trained, "positions": positions}

    @staticmethod
    def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Samples -> a batch: inputs, labels (the next ids), loss mask of the labels, positions of the inputs."""
        tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
        trained = torch.from_numpy(np.stack([s["trained"] for s in samples]))
        positions = torch.from_numpy(np.stack([s["positions"] for s in samples]))
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                "loss_mask": trained[:, 1:].float().contiguous(), "position_ids": positions[:, :-1].contiguous()}


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The id padding slots hold (no loss is taken there): the tokenizer's pad, else its EOS, else 0."""
    for value in (tokenizer.pad_id, tokenizer.eos_id):
        if value is not None:
            return value
    return 0


@dataclass
class InstructionData:
    """The datasets of an instruction fine-tune and the prompt style they were rendered in."""

    datasets: dict[str, InstructionDataset]
    style: str


@dataclass
class RecordSplits:
    """A fine-tuning file's records split into training and validation, and the prompt style they render in."""

    path: Path
    valid_path: Path | None
    train: list
    valid: list
    fraction: float
    """The held-out share (0 with a separate validation file or no validation)."""
    style: str

    def sources(self) -> dict[str, tuple[Path, list, str]]:
        """Split name -> (its file, its records, the cache's name for that split)."""
        key = "all" if self.valid_path is not None else None
        return {"train": (self.path, self.train, key or "train"),
                "valid": (self.valid_path or self.path, self.valid, key or "valid")}


def split_file(cfg, path: Path, valid_path: Path | None, load: Callable[[Path], tuple[list, bool]],
               counts: dict[str, int], tokenizer: Tokenizer, error: type[Exception]) -> RecordSplits:
    """``load`` the records of ``path`` (and ``valid_path``; else hold out ``val_split_fraction`` with the seed when
    the run validates) and resolve the prompt style (``error`` names the file when the style cannot apply)."""
    records, chat = load(path)
    if valid_path is not None:
        valid, valid_chat = load(valid_path)
        chat = chat or valid_chat
        train, fraction = records, 0.0
    elif counts.get("valid", 0) > 0:
        train, valid = split_records(records, cfg.val_split_fraction, cfg.seed)
        fraction = cfg.val_split_fraction
    else:  # no evaluation in this run (eval_iters 0): every record trains
        train, valid, fraction = records, [], 0.0
    try:
        style = resolve_style(cfg.prompt_style, chat, tokenizer)
    except TokenizerError as err:
        raise error(f"{path}: {err}") from None
    return RecordSplits(path, valid_path, train, valid, fraction, style)


def split_datasets(splits: RecordSplits, counts: dict[str, int],
                   tokenize: Callable[[Path, list, str, bool], list], make: Callable[[str, list], object],
                   what: str) -> dict:
    """The datasets of the splits the run reads: ``tokenize(file, records, cache split name, allow_empty)`` (empty
    allowed for validation only), then ``make(split, examples)``; a validation split left empty is said and
    skipped."""
    out = {}
    for name, (source, records, key) in splits.sources().items():
        if not records or counts.get(name, 0) <= 0:
            continue
        examples = tokenize(source, records, key, name == "valid")
        if not examples:
            logger.warning("%s: no validation %s; running without validation", source, what)
            continue
        out[name] = make(name, examples)
    return out


def build_instruction_datasets(cfg, tokenizer: Tokenizer | None, counts: dict[str, int]) -> InstructionData:
    """train (and valid) datasets from ``sft_data_path`` (``sft_valid_data_path`` or a seeded split)."""
    if tokenizer is None:
        raise InstructionDataError("sft_data_path needs a tokenizer (tokenizer_type and vocab_file) to turn records "
                                   "into ids")
    valid_path = Path(cfg.sft_valid_data_path) if cfg.sft_valid_data_path else None
    splits = split_file(cfg, Path(cfg.sft_data_path), valid_path, load_records, counts, tokenizer,
                        InstructionDataError)
    pad = pad_id_of(tokenizer)
    out = split_datasets(
        splits, counts,
        lambda source, recs, key, empty: cached_examples(source, recs, key, tokenizer, splits.style, cfg.seq_length,
                                                         cfg.mask_prompt, cfg.seed, splits.fraction, empty),
        lambda name, examples: InstructionDataset(name, examples, cfg.seq_length, counts[name], cfg.seed,
                                                  cfg.sft_packing, pad),
        f"record has a response token within seq_length {cfg.seq_length}")
    logger.info("instruction data %s: %d training and %d validation records, prompt style %s, %s", splits.path,
                len(splits.train), len(splits.valid), splits.style, "packed" if cfg.sft_packing else "padded")
    return InstructionData(out, splits.style)


def write_label_datasets(inputs: list[Path], output_prefix: str, tokenizer: Tokenizer, style: str | None,
                         mask_prompt: bool = True, encoding: str = "utf-8") -> tuple[str, str, int, int]:
    """Instruction records -> ``{prefix}_text_document`` (token ids) and ``{prefix}_label_document`` (int32 labels,
    -100 without loss) in GPT-NeoX's format; for corpora too large to tokenise at start-up. Returns the two
    prefixes, the records and the tokens written. Records are not truncated: training packs them by seq_length."""
    from neox_llama.data.indexed import IndexedDatasetWriter, token_dtype

    text_prefix, label_prefix = f"{output_prefix}_text_document", f"{output_prefix}_label_document"
    conversations, chat = [], False
    for path in inputs:
        records, is_chat = load_records(path, encoding)
        conversations += [(path, i, r) for i, r in enumerate(records)]
        chat = chat or is_chat
    try:
        chosen = resolve_style(style, chat, tokenizer)
    except TokenizerError as err:
        raise InstructionDataError(f"{inputs[0]}: {err}") from None
    tokens = 0
    with IndexedDatasetWriter(text_prefix, token_dtype(tokenizer.vocab_size)) as text, \
            IndexedDatasetWriter(label_prefix, np.int32) as labels:
        for path, index, messages in conversations:
            try:
                ids, trained = encode_dialog(tokenizer, chosen, messages, open_turn=False)
            except TokenizerError as err:
                raise InstructionDataError(f"{path}: record {index}: {err}") from None
            trained = trained if mask_prompt else [True] * len(ids)
            trained[0] = False
            text.add_document(ids)
            labels.add_document([t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)])
            tokens += len(ids)
    logger.info("%d records in prompt style %s -> %s.{bin,idx} and %s.{bin,idx} (%d tokens)", len(conversations),
                chosen, text_prefix, label_prefix, tokens)
    return text_prefix, label_prefix, len(conversations), tokens
