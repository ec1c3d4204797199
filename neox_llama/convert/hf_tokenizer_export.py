"""Tokenizer files for a Hugging Face export that encode exactly like our tokenizer.

- sentencepiece (Llama-2 style): a ``tokenizer.json`` BPE with sentencepiece's vocabulary and merges and a
  ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer, loaded as ``PreTrainedTokenizerFast``. (transformers'
  own conversion of ``tokenizer.model`` disagrees with sentencepiece on text that starts with a space.)
  ``tokenizer.model`` is copied too.
- Llama-3 tiktoken: ``tokenizer.json`` from transformers' ``TikTokenConverter`` with Meta's split pattern.
- ``tokenizer.json`` tokenizers are copied as they are.

A checkpoint trained in a prompt style also gets that style's chat template (:mod:`neox_llama.convert.chat_template`)
as ``chat_template`` in ``tokenizer_config.json`` (transformers >= 4.43 reads it) and as ``chat_template.jinja``
(transformers 5 reads that file first); the two hold the same text.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from neox_llama.convert.chat_template import chat_template
from neox_llama.tokenizers import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)


def _spm_tokenizer_json(model_file: Path, tokenizer: Tokenizer):
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    proto = SentencePieceExtractor(str(model_file)).proto
    if proto.trainer_spec.model_type != 2:
        raise TokenizerError(f"{model_file}: not a sentencepiece BPE model; only BPE models (Llama's) can be exported")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # Merge priority follows the piece scores, as in sentencepiece (whitespace-only pieces come last).
    merges = generate_merges(vocab, {piece.piece: piece.score for piece in proto.pieces})
    sp = tokenizer.sp
    unk = sp.id_to_piece(sp.unk_id())
    fast = FastTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(content=" ", left=1, right=0)])
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return fast


def _llama3_tokenizer_json(model_file: Path, tokenizer: Tokenizer):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from neox_llama.tokenizers.llama3_tokenizer import PATTERN

    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    return TikTokenConverter(vocab_file=str(model_file), pattern=PATTERN, extra_special_tokens=specials).converted()


def _add_bos_post_processor(path: Path, tokenizer: Tokenizer) -> None:
    """``AutoTokenizer(text)`` adds BOS exactly as our training data and generation do (the start-token policy)."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers.processors import TemplateProcessing

    fast = FastTokenizer.from_file(str(path))
    bos = next(t for t, i in tokenizer.special_tokens.items() if i == tokenizer.bos_id)
    fast.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                             special_tokens=[(bos, tokenizer.bos_id)])
    fast.save(str(path))


def _template(tokenizer: Tokenizer, prompt_style: str | None) -> str | None:
    if prompt_style is None:
        return None
    try:
        return chat_template(prompt_style, tokenizer)
    except TokenizerError as err:
        logger.warning("no chat template written: %s", err)
        return None


def reward_pad_id(tokenizer: Tokenizer) -> int | None:
    """A pad id for a reward model's export: transformers scores the rightmost token that is not padding, so the pad
    must never be a real token of a scored sequence (not BOS, EOS or end-of-turn): the tokenizer's own pad, else its
    unknown token (sentencepiece with byte fallback never produces it), else None."""
    taken = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "eot_id", None)}
    if tokenizer.pad_id is not None and tokenizer.pad_id not in taken:
        return tokenizer.pad_id
    candidates = [i for t, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
                  if i not in taken and "unk" in t.lower()]
    return candidates[0] if candidates else None


def write_tokenizer_files(tokenizer: Tokenizer, output: Path, prompt_style: str | None = None,
                          pad_id: int | None = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ tokenizer.model, + the chat template
    of ``prompt_style`` in tokenizer_config.json and chat_template.jinja, + ``pad_id`` as the pad token); returns the
    bos/eos (and pad) ids for the model config."""
    source = tokenizer.files[0]
    if tokenizer.name == "SPMTokenizer":
        _spm_tokenizer_json(source, tokenizer).save(str(output / "tokenizer.json"))
        shutil.copyfile(source, output / "tokenizer.model")
    elif tokenizer.name == "Llama3Tokenizer":
        _llama3_tokenizer_json(source, tokenizer).save(str(output / "tokenizer.json"))
    else:
        shutil.copyfile(source, output / "tokenizer.json")
    if tokenizer.starts_with_bos and tokenizer.name != "HFTokenizer":  # a tokenizer.json keeps its own post-processor
        _add_bos_post_processor(output / "tokenizer.json", tokenizer)
    id_to_token = {i: t for t, i in tokenizer.special_tokens.items()}
    bos = id_to_token.get(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    eos = id_to_token.get(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos,
        "add_bos_token": tokenizer.starts_with_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    template = _template(tokenizer, prompt_style)
    if template is not None:
        config["chat_template"] = template
        (output / "chat_template.jinja").write_text(template, encoding="utf-8")
    specials = {"bos_token": bos, "eos_token": eos}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if pad_id is not None:
        if pad_id in id_to_token:
            config["pad_token"] = specials["pad_token"] = id_to_token[pad_id]
        ids["pad_token_id"] = pad_id
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (output / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return ids
