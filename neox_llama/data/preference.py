"""Preference data for DPO and IPO: JSON or JSONL pairs -> a prompt and two responses as ids -> samples of pairs.

A record is one of the common formats:

- ``{"prompt": str, "chosen": str, "rejected": str}``: one user turn and two answers;
- conversational: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` / ``rejected`` the assistant
  message(s) that answer it (a list, or one message object);
- ``chosen`` / ``rejected`` as whole conversations that share their first messages (the prompt) and differ after;
- LLaMA-Factory's ShareGPT pairs: ``conversations`` (``from``: human / gpt / system, ``value``) and ``chosen`` /
  ``rejected`` as one ``{from: gpt, value}`` message each.

Each side is rendered in the run's prompt style exactly as instruction data is (:mod:`neox_llama.tokenizers.
prompts`); only the response after the prompt carries loss. A pair longer than ``seq_length + 1`` tokens is cut by
one rule for both sides: the prompt from the left (its first id, BOS, kept) as far as the longer side needs, then
each response from the right; a pair with a response left empty is dropped. Every record is checked before training
starts; a bad one is one error naming the file, the record and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neox_llama.data.instruction import (
    InstructionDataError,
    _parse_file,
    _tokenizer_digest,
    pad_id_of,
    split_datasets,
    split_file,
)
from neox_llama.distributed import agree
from neox_llama.tokenizers.base import Tokenizer, TokenizerError
from neox_llama.tokenizers.prompts import Message, check_conversation, encode_dialog
from neox_llama.tokenizers.text import unencodable_reason

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class PreferenceDataError(InstructionDataError):
    """A preference file or record is malformed; the message names the file, the record and the field."""


@dataclass
class PreferencePair:
    """One record: the prompt's messages and the two answers that follow it."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None
    """A reward model's margin (``rm_margin_key``), else None."""


# --------------------------------------------------------------------------- records
def _check_text(text: str, where: str) -> None:
    """Text no tokenizer can encode (a lone surrogate such as JSON's "\\ud800") is a malformed record."""
    bad = unencodable_reason(text)
    if bad:
        raise PreferenceDataError(f"{where} holds {bad}")


def _message(value: object, where: str, roles: dict[str, str] | None = None) -> Message:
    """A ``{role, content}`` (or, with ``roles``, a ShareGPT ``{from, value}``) object as a Message."""
    role_key, text_key = ("from", "value") if roles else ("role", "content")
    if not isinstance(value, dict):
        raise PreferenceDataError(f"{where} must be an object with {role_key} and {text_key}")
    for key in (role_key, text_key):
        if not isinstance(value.get(key), str):
            found = "missing" if key not in value else f"a {type(value[key]).__name__}"
            raise PreferenceDataError(f"{where}.{key} is {found}; it must be a string")
    role = (roles or {r: r for r in ("system", "user", "assistant")}).get(value[role_key])
    if role is None:
        valid = ", ".join(roles or ("system", "user", "assistant"))
        raise PreferenceDataError(f"{where}.{role_key} {value[role_key]!r} is unknown; valid: {valid}")
    _check_text(value[text_key], f"{where}.{text_key}")
    return Message(role, value[text_key])


def _messages(value: object, where: str, roles: dict[str, str] | None = None) -> list[Message]:
    if isinstance(value, dict):
        return [_message(value, where, roles)]
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(f"{where} must be a non-empty list of messages")
    return [_message(m, f"{where}[{i}]", roles) for i, m in enumerate(value)]


def _answer(value: object, where: str, roles: dict[str, str] | None = None) -> list[Message]:
    """A response: a string (one assistant message) or assistant message(s)."""
    if isinstance(value, str):
        _check_text(value, where)
        return [Message("assistant", value)]
    messages = _messages(value, where, roles)
    if messages[0].role != "assistant":
        raise PreferenceDataError(f"{where} must start with an assistant message (the answer to the prompt), not a "
                                  f"{messages[0].role} one")
    return messages


def record_pair(record: object, where: str, margin_key: str | None = None) -> PreferencePair:
    """``record`` (any of the module's formats) as a prompt and two answers (and ``margin_key``'s number)."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: a record must be an object, not {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise PreferenceDataError(f"{where}: field {key!r} is missing; a preference record needs chosen and "
                                      "rejected (and a prompt, conversations, or chosen/rejected conversations "
                                      "sharing their first messages)")
    if "conversations" in record:  # LLaMA-Factory's ShareGPT pairs
        prompt = _messages(record["conversations"], f"{where}: conversations", SHAREGPT_ROLES)
        pair = PreferencePair(prompt, _answer(record["chosen"], f"{where}: chosen", SHAREGPT_ROLES),
                              _answer(record["rejected"], f"{where}: rejected", SHAREGPT_ROLES))
    elif "prompt" in record:
        raw = record["prompt"]
        if isinstance(raw, str):
            _check_text(raw, f"{where}: prompt")
            prompt = [Message("user", raw)]
        else:
            prompt = _messages(raw, f"{where}: prompt")
        pair = PreferencePair(prompt, _answer(record["chosen"], f"{where}: chosen"),
                              _answer(record["rejected"], f"{where}: rejected"))
    else:  # whole conversations sharing a prefix
        chosen = _messages(record["chosen"], f"{where}: chosen")
        rejected = _messages(record["rejected"], f"{where}: rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0 or shared == len(chosen) or shared == len(rejected):
            raise PreferenceDataError(f"{where}: chosen and rejected must share their first messages (the prompt) "
                                      "and then differ; give a prompt field otherwise")
        pair = PreferencePair(chosen[:shared], _answer([_dict(m) for m in chosen[shared:]], f"{where}: chosen"),
                              _answer([_dict(m) for m in rejected[shared:]], f"{where}: rejected"))
    for side in ("chosen", "rejected"):
        problem = check_conversation(pair.prompt + getattr(pair, side), open_turn=False)
        if problem:
            raise PreferenceDataError(f"{where}: prompt + {side}: {problem}")
    if pair.prompt[-1].role == "assistant":
        raise PreferenceDataError(f"{where}: the prompt ends with an assistant message; it must end with the user "
                                  "turn the answers reply to")
    if margin_key is not None:
        value = record.get(margin_key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            found = "missing" if margin_key not in record else repr(value)
            raise PreferenceDataError(f"{where}: {margin_key} (rm_margin_key) is {found}; it must be a finite number, "
                                      "the margin the chosen answer's score must beat the rejected one's by")
        pair.margin = float(value)
    return pair


def _dict(message: Message) -> dict:
    return {"role": message.role, "content": message.content}


def load_pairs(path: str | Path, encoding: str = "utf-8",
               margin_key: str | None = None) -> tuple[list[PreferencePair], bool]:
    """Every record of ``path`` as a pair (with ``margin_key``'s margin), and whether any was conversational (a chat
    prompt style then)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: preference data file not found")
    data = _parse_file(path, encoding)
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: the JSON must be a list of records")
    if not data:
        raise PreferenceDataError(f"{path}: holds no records")
    pairs = [record_pair(r, f"{path}: record {i}", margin_key) for i, r in enumerate(data)]
    chat = any(isinstance(r, dict) and ("conversations" in r or not isinstance(r.get("prompt", ""), str)) for r in data)
    return pairs, chat


# --------------------------------------------------------------------------- tokens
@dataclass
class PairExample:
    """A pair as ids: the prompt, shared, then each response (ids after the prompt, all carrying loss)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    margin: np.ndarray | None = None
    """[1] float64: the record's margin (reward models with ``rm_margin_key``)."""


def _encode_side(tokenizer: Tokenizer, style: str, pair: PreferencePair, side: str, prompt: list[int],
                 where: str) -> list[int]:
    ids, _ = encode_dialog(tokenizer, style, pair.prompt + getattr(pair, side), open_turn=False)
    if ids[:len(prompt)] != prompt:
        raise PreferenceDataError(f"{where}: prompt style {style} renders the prompt differently before the {side} "
                                  "answer; the answers cannot be scored after one shared prompt")
    return ids[len(prompt):]


def cut_pair(prompt: list[int], chosen: list[int], rejected: list[int], limit: int,
             keep_first: bool) -> tuple[list[int], list[int], list[int]] | None:
    """One rule for both sides of a pair: the prompt from the left (its first id kept when ``keep_first``) as far as
    the longer side needs, keeping one prompt id; then each response from the right. None: a response is left
    without ids."""
    longest = len(prompt) + max(len(chosen), len(rejected))
    if longest > limit:
        head = 1 if keep_first else 0
        removable = max(0, len(prompt) - head - 1)
        cut = min(longest - limit, removable)
        prompt = prompt[:head] + prompt[head + cut:]
        room = limit - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        return None
    return prompt, chosen, rejected


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, style: str, seq_length: int, where: str,
                   allow_empty: bool = False) -> list[PairExample]:
    """Examples of ``pairs`` cut to ``seq_length + 1`` ids per side; logs how many were truncated and dropped."""
    examples, truncated, dropped = [], 0, 0
    for index, pair in enumerate(pairs):
        at = f"{where}: record {index}"
        try:
            prompt, _ = encode_dialog(tokenizer, style, pair.prompt, open_turn=True)
            chosen = _encode_side(tokenizer, style, pair, "chosen", prompt, at)
            rejected = _encode_side(tokenizer, style, pair, "rejected", prompt, at)
        except TokenizerError as err:
            raise PreferenceDataError(f"{at}: {err}") from None
        cut = cut_pair(prompt, chosen, rejected, seq_length + 1, keep_first=prompt[0] == tokenizer.bos_id)
        if cut is None:
            dropped += 1
            continue
        truncated += sum(map(len, cut)) < len(prompt) + len(chosen) + len(rejected)
        margin = None if pair.margin is None else np.asarray([pair.margin], dtype=np.float64)
        examples.append(PairExample(*(np.asarray(part, dtype=np.int32) for part in cut), margin))
    if truncated or dropped:
        logger.info("%s: %d of %d pairs truncated to %d tokens per side, %d dropped (a response "
                    "left empty)", where, truncated, len(pairs), seq_length + 1, dropped)
    if not examples and not allow_empty:
        raise PreferenceDataError(f"{where}: no pair keeps a token of both responses within seq_length {seq_length}")
    return examples


def cached_examples(path: Path, name: str, tokenizer: Tokenizer, style: str, seq_length: int, seed: int,
                    fraction: float, kind: str, parts: tuple[str, ...], tokenize: Callable[[], list]) -> list:
    """``tokenize()``'s examples (dataclasses whose ``parts`` are int arrays), built once (one builder per node) and
    kept beside ``path``, keyed by everything that shapes them (file, tokenizer files, style, length, split)."""
    stat = path.stat()
    key = {"tokenizer": _tokenizer_digest(tokenizer), "style": style, "seq": seq_length, "split": name, "seed": seed,
           "fraction": fraction, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "version": 1, "kind": kind}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = path.with_name(f".{path.name}.{digest}.{kind}.npz")
    made: list = []

    def build() -> None:
        if cache.exists():
            return
        made.extend(tokenize())
        arrays = {}
        for part in parts:
            arrays[part] = np.concatenate([getattr(e, part) for e in made] or [np.zeros(0, np.int32)])
            arrays[f"{part}_lengths"] = np.asarray([len(getattr(e, part)) for e in made], dtype=np.int64)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, cache)
        except OSError as err:  # a read-only data folder: every rank tokenises for itself instead
            tmp.unlink(missing_ok=True)
            logger.warning("%s: cannot cache the tokenised records beside it (%s); tokenising them on every rank",
                           path, err)

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        agree(build)
    else:
        agree(lambda: None)
    if not cache.exists():
        return made or tokenize()
    with np.load(cache) as data:
        count = len(data[f"{parts[0]}_lengths"])
        split = {part: np.split(data[part], np.cumsum(data[f"{part}_lengths"])[:-1]) for part in parts}
    return [dict(zip(parts, (split[part][i] for part in parts), strict=True)) for i in range(count)]


def cached_pairs(path: Path, pairs: list[PreferencePair], name: str, tokenizer: Tokenizer, style: str,
                 seq_length: int, seed: int, fraction: float, allow_empty: bool = False,
                 margin_key: str | None = None) -> list[PairExample]:
    """Tokenise ``pairs`` once (:func:`cached_examples`; with their ``margin_key`` margins)."""
    parts = ("prompt", "chosen", "rejected", "margin") if margin_key else ("prompt", "chosen", "rejected")
    kind = f"pairs-margin-{hashlib.sha1(margin_key.encode()).hexdigest()[:8]}" if margin_key else "pairs"
    examples = cached_examples(path, name, tokenizer, style, seq_length, seed, fraction, kind, parts,
                               lambda: tokenize_pairs(pairs, tokenizer, style, seq_length, f"{path} ({name})",
                                                      allow_empty))
    return [e if isinstance(e, PairExample) else PairExample(**e) for e in examples]


# --------------------------------------------------------------------------- samples
class PreferenceDataset:
    """``num_samples`` pairs from ``examples``, epoch after epoch, each in a fresh order drawn from the seed.

    A sample is both sides padded to ``seq_length + 1`` ids: ``tokens`` [2, seq + 1] (chosen, rejected),
    ``trained`` (loss on predicting that id: the response's ids) and ``positions``; with precomputed reference
    log-probabilities, ``reference`` [2] too (TRL's ``ref_chosen_logps`` / ``ref_rejected_logps`` columns).
    """

    def __init__(self, name: str, examples: list[PairExample], seq_length: int, num_samples: int, seed: int,
                 pad_id: int):
        self.name, self.examples, self.length, self.pad_id = name, examples, seq_length + 1, pad_id
        self.reference: np.ndarray | None = None
        """``preference_reference: precomputed``: [examples, 2] reference log-probabilities (chosen, rejected)."""
        self.order: list[int] = []
        self.epoch_starts: list[int] = [0]
        epoch = 0
        while len(self.order) < num_samples:
            self.order += np.random.RandomState((seed + 7919 * epoch) % 2**32).permutation(len(examples)).tolist()
            self.epoch_starts.append(len(self.order))
            epoch += 1
        del self.order[num_samples:]

    def __len__(self) -> int:
        return len(self.order)

    def epoch_of(self, sample: int) -> int:
        """The epoch (from 1) that sample index ``sample`` belongs to."""
        return int(np.searchsorted(self.epoch_starts, sample, side="right"))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.sample(self.order[index])

    def sample(self, example_index: int) -> dict[str, np.ndarray]:
        """Example ``example_index`` as a sample (with its precomputed reference log-probabilities, if any)."""
        example = self.examples[example_index]
        tokens = np.full((2, self.length), self.pad_id, dtype=np.int64)
        trained = np.zeros((2, self.length), dtype=np.bool_)
        p = len(example.prompt)
        for row, response in enumerate((example.chosen, example.rejected)):
            n = p + len(response)
            tokens[row, :p], tokens[row, p:n] = example.prompt, response
            trained[row, p:n] = True
        positions = np.broadcast_to(np.arange(self.length), (2, self.length)).copy()
        out = {"tokens": tokens, "trained": trained, "positions": positions}
        if example.margin is not None:
            out["margin"] = example.margin
        if self.reference is not None:
            out["reference"] = self.reference[example_index]
        return out

    @staticmethod
    def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Pairs -> a batch of 2B rows, the B chosen sides first, then the B rejected ones (as TRL orders them)."""
        tokens = torch.from_numpy(np.concatenate([np.stack([s["tokens"][side] for s in samples]) for side in (0, 1)]))
        trained = torch.from_numpy(np.concatenate([np.stack([s["trained"][side] for s in samples]) for side in (0, 1)]))
        positions = torch.from_numpy(np.concatenate([np.stack([s["positions"][side] for s in samples])
                                                     for side in (0, 1)]))
        out = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "loss_mask": trained[:, 1:].float().contiguous(), "position_ids": positions[:, :-1].contiguous()}
        if "margin" in samples[0]:  # a reward model's margins, one per pair
            out["margin"] = torch.from_numpy(np.concatenate([s["margin"] for s in samples]))
        if "reference" in samples[0]:  # precomputed: each row's reference log-probability, chosen rows first
            out["reference_logps"] = torch.from_numpy(np.concatenate([np.stack([s["reference"][side] for s in samples])
                                                                      for side in (0, 1)]))
        return out


@dataclass
class PreferenceData:
    """The datasets of a preference run and the prompt style they were rendered in."""

    datasets: dict[str, PreferenceDataset]
    style: str


def build_preference_datasets(cfg, tokenizer: Tokenizer | None, counts: dict[str, int]) -> PreferenceData:
    """train (and valid) pairs from ``preference_data_path`` (``preference_valid_data_path`` or a seeded split)."""
    if tokenizer is None:
        raise PreferenceDataError("preference_data_path needs a tokenizer (tokenizer_type and vocab_file) to turn "
                                  "records into ids")
    margin_key = cfg.rm_margin_key if cfg.preference_loss == "rm" else None
    valid_path = Path(cfg.preference_valid_data_path) if cfg.preference_valid_data_path else None
    splits = split_file(cfg, Path(cfg.preference_data_path), valid_path,
                        lambda p: load_pairs(p, margin_key=margin_key), counts, tokenizer, PreferenceDataError)
    # a reward model scores each side's last token, so a side must fit the seq_length inputs (not + 1)
    seq = cfg.seq_length - 1 if cfg.preference_loss == "rm" else cfg.seq_length
    pad = pad_id_of(tokenizer)
    out = split_datasets(
        splits, counts,
        lambda source, pairs, key, empty: cached_pairs(source, pairs, key, tokenizer, splits.style, seq, cfg.seed,
                                                       splits.fraction, empty, margin_key),
        lambda name, examples: PreferenceDataset(name, examples, cfg.seq_length, counts[name], cfg.seed, pad),
        f"pair keeps both responses within seq_length {cfg.seq_length}")
    logger.info("preference data %s: %d training and %d validation pairs, prompt style %s", splits.path,
                len(splits.train), len(splits.valid), splits.style)
    return PreferenceData(out, splits.style)
