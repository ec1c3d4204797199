"""Unpaired feedback for KTO: JSON or JSONL completions marked desirable or not -> ids -> micro-batches that carry,
beside each prompt + completion row, the mismatched row KTO's reference point is estimated from.

A record is one of:

- LLaMA-Factory's KTO format: ``messages`` (``{role, content}``, or ShareGPT's ``{from, value}``; also under
  ``conversations``), the last assistant turn(s) the completion, the messages before it the prompt, and a boolean
  ``label`` (true: desirable);
- TRL's unpaired format: ``prompt`` (a string or messages), ``completion`` (a string or assistant message(s)) and
  ``label``.

Each record is rendered in the run's prompt style as preference pairs are (:mod:`neox_llama.data.preference`); only
the completion carries loss; one cut to ``seq_length + 1`` ids (the prompt from the left, BOS kept, then the
completion from the right). A micro-batch of B completions also holds B mismatched rows, prompt ``i`` with the
completion of example ``i - 1`` (the first with the last), as TRL builds them within each per-device batch; such a row
is cut from the right where it is longer than ``seq_length + 1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neox_llama.data.instruction import _parse_file, pad_id_of, split_datasets, split_file
from neox_llama.data.preference import (
    SHAREGPT_ROLES,
    PreferenceData,
    PreferenceDataError,
    PreferenceDataset,
    _answer,
    _check_text,
    _messages,
    cached_examples,
    cut_pair,
)
from neox_llama.tokenizers.base import Tokenizer, TokenizerError
from neox_llama.tokenizers.prompts import Message, check_conversation, encode_dialog

logger = logging.getLogger(__name__)


@dataclass
class FeedbackRecord:
    """One record: the prompt's messages, the completion that follows them and whether it is desirable."""

    prompt: list[Message]
    completion: list[Message]
    desirable: bool


def record_feedback(record: object, where: str) -> FeedbackRecord:
    """``record`` (LLaMA-Factory's or TRL's unpaired format) as a prompt, a completion and its label."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: a record must be an object, not {type(record).__name__}")
    if "label" not in record:
        raise PreferenceDataError(f"{where}: field 'label' is missing; a KTO record needs a boolean label (true: "
                                  "desirable) beside messages, or prompt and completion")
    if not isinstance(record["label"], bool):
        raise PreferenceDataError(f"{where}: label must be true or false, not {json_name(record['label'])}")
    key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    if key is not None:
        raw = record[key]
        sharegpt = isinstance(raw, list) and bool(raw) and isinstance(raw[0], dict) and "from" in raw[0]
        messages = _messages(raw, f"{where}: {key}", SHAREGPT_ROLES if sharegpt else None)
        split = len(messages)
        while split > 0 and messages[split - 1].role == "assistant":
            split -= 1
        if split == len(messages) or split == 0:
            raise PreferenceDataError(f"{where}: {key} must end with the assistant answer (the completion) after at "
                                      "least one user message (the prompt)")
        prompt, completion = messages[:split], messages[split:]
    elif "prompt" in record and "completion" in record:
        raw = record["prompt"]
        if isinstance(raw, str):
            _check_text(raw, f"{where}: prompt")
            prompt = [Message("user", raw)]
        else:
            prompt = _messages(raw, f"{where}: prompt")
        completion = _answer(record["completion"], f"{where}: completion")
    else:
        raise PreferenceDataError(f"{where}: a KTO record needs messages (or conversations), or prompt and "
                                  "completion, beside its label")
    problem = check_conversation(prompt + completion, open_turn=False)
    if problem:
        raise PreferenceDataError(f"{where}: prompt + completion: {problem}")
    if prompt[-1].role == "assistant":
        raise PreferenceDataError(f"{where}: the prompt ends with an assistant message; it must end with the user "
                                  "turn the completion replies to")
    return FeedbackRecord(prompt, completion, record["label"])


def json_name(value: object) -> str:
    """How JSON writes ``value``'s kind (for messages about a record's fields)."""
    names = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def load_feedback(path: str | Path, encoding: str = "utf-8") -> tuple[list[FeedbackRecord], bool]:
    """Every record of ``path``, and whether any was conversational (a chat prompt style then)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: feedback data file not found")
    data = _parse_file(path, encoding)
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: the JSON must be a list of records")
    if not data:
        raise PreferenceDataError(f"{path}: holds no records")
    records = [record_feedback(r, f"{path}: record {i}") for i, r in enumerate(data)]
    chat = any(isinstance(r, dict) and ("prompt" not in r or not isinstance(r["prompt"], str)) for r in data)
    return records, chat


# --------------------------------------------------------------------------- tokens
@dataclass
class FeedbackExample:
    """A record as ids: the prompt, the completion (all carrying loss) and the label (one int: 1 desirable)."""

    prompt: np.ndarray
    completion: np.ndarray
    label: np.ndarray

    @property
    def desirable(self) -> bool:
        return bool(self.label[0])


def tokenize_feedback(records: list[FeedbackRecord], tokenizer: Tokenizer, style: str, seq_length: int, where: str,
                      allow_empty: bool = False) -> list[FeedbackExample]:
    """Examples of ``records`` cut to ``seq_length + 1`` ids; logs how many were truncated and dropped."""
    examples, truncated, dropped = [], 0, 0
    for index, record in enumerate(records):
        at = f"{where}: record {index}"
        try:
            prompt, _ = encode_dialog(tokenizer, style, record.prompt, open_turn=True)
            ids, _ = encode_dialog(tokenizer, style, record.prompt + record.completion, open_turn=False)
        except TokenizerError as err:
            raise PreferenceDataError(f"{at}: {err}") from None
        if ids[:len(prompt)] != prompt:
            raise PreferenceDataError(f"{at}: prompt style {style} renders the prompt differently before the "
                                      "completion; it cannot be scored after the prompt")
        completion = ids[len(prompt):]
        cut = cut_pair(prompt, completion, completion, seq_length + 1, keep_first=prompt[0] == tokenizer.bos_id)
        if cut is None:
            dropped += 1
            continue
        truncated += len(cut[0]) + len(cut[1]) < len(ids)
        examples.append(FeedbackExample(np.asarray(cut[0], np.int32), np.asarray(cut[1], np.int32),
                                        np.asarray([int(record.desirable)], np.int32)))
    if truncated or dropped:
        logger.info("%s: %d of %d records truncated to seq_length + 1 = %d tokens, %d dropped (the completion left "
                    "empty)", where, truncated, len(records), seq_length + 1, dropped)
    if not examples and not allow_empty:
        raise PreferenceDataError(f"{where}: no record keeps a completion token within seq_length {seq_length}")
    return examples


# --------------------------------------------------------------------------- samples
class FeedbackDataset(PreferenceDataset):
    """``num_samples`` completions, epoch after epoch in seeded orders; :meth:`collate` makes a micro-batch of 2B
    rows: the B prompt + completion rows, then the B mismatched rows, and ``desirable`` [B]."""

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.examples[self.order[index]]
        return {"prompt": example.prompt, "completion": example.completion, "label": example.label}

    def _row(self, prompt: np.ndarray, completion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full(self.length, self.pad_id, dtype=np.int64)
        trained = np.zeros(self.length, dtype=np.bool_)
        ids = np.concatenate([prompt, completion])[: self.length]  # a mismatched row: cut from the right
        tokens[: len(ids)] = ids
        trained[len(prompt): len(ids)] = True
        return tokens, trained

    def collate(self, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """The micro-batch (its mismatched rows pair prompt i with completion i - 1)."""
        rows = [self._row(s["prompt"], s["completion"]) for s in samples]
        rows += [self._row(s["prompt"], samples[i - 1]["completion"]) for i, s in enumerate(samples)]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        trained = torch.from_numpy(np.stack([r[1] for r in rows]))
        positions = torch.arange(self.length).expand(len(rows), -1)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                "loss_mask": trained[:, 1:].float().contiguous(), "position_ids": positions[:, :-1].contiguous(),
                "desirable": torch.tensor([bool(s["label"][0]) for s in samples])}


def cached_feedback(path: Path, records: list[FeedbackRecord], name: str, tokenizer: Tokenizer, style: str,
                    seq_length: int, seed: int, fraction: float, allow_empty: bool = False) -> list[FeedbackExample]:
    examples = cached_examples(path, name, tokenizer, style, seq_length, seed, fraction, "feedback",
                               ("prompt", "completion", "label"),
                               lambda: tokenize_feedback(records, tokenizer, style, seq_length, f"{path} ({name})",
                                                         allow_empty))
    return [e if isinstance(e, FeedbackExample) else FeedbackExample(**e) for e in examples]


def build_feedback_datasets(cfg, tokenizer: Tokenizer | None, counts: dict[str, int]) -> PreferenceData:
    """train (and valid) completions of a KTO run from ``preference_data_path`` (``preference_valid_data_path`` or
    a seeded split)."""
    if tokenizer is None:
        raise PreferenceDataError("preference_data_path needs a tokenizer (tokenizer_type and vocab_file) to turn "
                                  "records into ids")
    valid_path = Path(cfg.preference_valid_data_path) if cfg.preference_valid_data_path else None
    splits = split_file(cfg, Path(cfg.preference_data_path), valid_path, load_feedback, counts, tokenizer,
                        PreferenceDataError)
    pad = pad_id_of(tokenizer)
    out = split_datasets(
        splits, counts,
        lambda source, records, key, empty: cached_feedback(source, records, key, tokenizer, splits.style,
                                                            cfg.seq_length, cfg.seed, splits.fraction, empty),
        lambda name, examples: FeedbackDataset(name, examples, cfg.seq_length, counts[name], cfg.seed, pad),
        f"record keeps a completion within seq_length {cfg.seq_length}")
    desirable = sum(r.desirable for r in splits.train)
    logger.info("feedback data %s: %d training records (%d desirable, %d undesirable) and %d validation records, "
                "prompt style %s", splits.path, len(splits.train), desirable, len(splits.train) - desirable,
                len(splits.valid), splits.style)
    return PreferenceData(out, splits.style)
