"""Our tokenizers give exactly the ids of the reference libraries called directly."""

from __future__ import annotations

import logging

import pytest
import sentencepiece as spm
from helpers.assets import asset
from helpers.tokenizers import TEXTS, llama3_reference

from neox_llama.tokenizers import TokenizerError, build_tokenizer
from neox_llama.tokenizers import text as text_policy


def test_llama3_ids_equal_tiktoken_with_metas_pattern():
    ours = build_tokenizer("Llama3Tokenizer", asset("llama3-tokenizer"))
    ref = llama3_reference()
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, allowed_special=set(), disallowed_special=()), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode_batch(TEXTS) == [ref.encode(t, disallowed_special=()) for t in TEXTS]
    assert [list(ids) for ids in ours.encode_arrays(TEXTS)] == ours.encode_batch(TEXTS)
    chat = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert ours.encode(chat, allow_special=True) == ref.encode(chat, allowed_special="all")
    assert ours.vocab_size == 128_256 and ours.special_tokens["<|reserved_special_token_245|>"] == 128_255
    assert (ours.bos_id, ours.eos_id, ours.eod_id, ours.eot_id) == (128_000, 128_001, 128_001, 128_009)
    assert ours.token_to_id("<|start_header_id|>") == 128_006


def test_sentencepiece_ids_equal_the_library():
    path = asset("spm-32k")
    ours = build_tokenizer("SPMTokenizer", path)
    ref = spm.SentencePieceProcessor(model_file=str(path))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.encode_batch(TEXTS) == ref.encode(TEXTS)
    assert (ours.bos_id, ours.eos_id, ours.eod_id, ours.vocab_size) == (1, 2, 2, 32_000)
    assert ours.decode(ours.encode(" leading space")) == ref.decode(ref.encode(" leading space"))
    assert ours.encode("a</s>b", allow_special=True) == [*ref.encode("a"), 2, *ref.encode("b")]


def test_hf_tokenizer_json_equals_tokenizers_and_matches_tiktoken(tmp_path):
    from tokenizers import Tokenizer as RefTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ref3 = llama3_reference()
    specials = sorted(ref3._special_tokens, key=ref3._special_tokens.get)
    converter = TikTokenConverter(vocab_file=str(asset("llama3-tokenizer")), pattern=ref3._pat_str,
                                  extra_special_tokens=specials)
    converter.converted().save(str(tmp_path / "tokenizer.json"))
    ours = build_tokenizer("HFTokenizer", tmp_path / "tokenizer.json")
    ref = RefTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    plain = [t for t in TEXTS if "<|" not in t]
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
    for text in plain:  # and the converted file tokenizes exactly like Meta's tiktoken encoding
        assert ours.encode(text) == ref3.encode(text), text
    assert (ours.bos_id, ours.eos_id) == (128_000, 128_001)


@pytest.mark.parametrize("kind", ["SPMTokenizer", "Llama3Tokenizer", "HFTokenizer"])
def test_missing_or_wrong_file_is_a_clear_error(tmp_path, kind):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        build_tokenizer(kind, tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("this is not a tokenizer\n")
    with pytest.raises(TokenizerError) as excinfo:
        build_tokenizer(kind, bad)
    assert str(bad) in str(excinfo.value)


def test_unknown_tokenizer_type(tmp_path):
    (tmp_path / "t").write_text("x")
    with pytest.raises(TokenizerError, match="use one of SPMTokenizer, Llama3Tokenizer, HFTokenizer"):
        build_tokenizer("GPT2Tokenizer", tmp_path / "t")


def _small_tokenizer_json(folder) -> str:
    """A byte-level BPE tokenizer.json trained in a moment (the HFTokenizer path without a download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


NOT_UNICODE = {
    "a \ud800 b": "a \ufffd b",  # a lone surrogate, as JSON's "\ud800" gives it
    b"caf\xe9 noir".decode("utf-8", "surrogateescape"): "caf\ufffd noir",  # a Latin-1 byte, as Python keeps argv's
    "\udfff\ud800 x": "\ufffd\ufffd x",
    "pair \ud83d\ude00": "pair \U0001f600",  # a surrogate pair is its character
}


@pytest.mark.parametrize("kind", ["SPMTokenizer", "Llama3Tokenizer", "HFTokenizer"])
def test_text_that_is_not_unicode_is_repaired_with_ufffd_by_every_tokenizer(tmp_path, kind, caplog, monkeypatch):
    """One text policy (neox_llama/tokenizers/text.py): the ids of text no library can take are those of the text
    with U+FFFD in place of each such character, on every encode path, said once per process."""
    monkeypatch.setattr(text_policy, "_warned", [])
    path = {"SPMTokenizer": lambda: asset("spm-32k"), "Llama3Tokenizer": lambda: asset("llama3-tokenizer"),
            "HFTokenizer": lambda: _small_tokenizer_json(tmp_path)}[kind]()
    tok = build_tokenizer(kind, path)
    bad, repaired = list(NOT_UNICODE), list(NOT_UNICODE.values())
    with caplog.at_level(logging.WARNING, logger=text_policy.__name__):
        for text, fixed in NOT_UNICODE.items():
            assert tok.encode(text) == tok.encode(fixed) and tok.encode(fixed), text
            assert tok.encode(text, allow_special=True) == tok.encode(fixed, allow_special=True), text
            assert tok.encode_document(text) == tok.encode_document(fixed), text
        assert tok.encode_batch(bad) == tok.encode_batch(repaired)
        assert [list(ids) for ids in tok.encode_arrays(bad)] == [list(ids) for ids in tok.encode_arrays(repaired)]
    assert [r.getMessage() for r in caplog.records] == [
        "text to tokenize holds a lone surrogate \\ud800 (not valid Unicode): each such character is encoded as U+FFFD "
        "(said once per process)"]


def test_training_a_tokenizer_skips_lines_no_tokenizer_can_encode(tmp_path, caplog):
    from neox_llama.tokenizers.train import train_sentencepiece

    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1\n" + "\n".join(TEXTS).encode())
    (tmp_path / "b.jsonl").write_text('{"text": "a \\ud800 b"}\n{broken\n{"text": "good text"}\n')
    with caplog.at_level(logging.WARNING, logger="neox_llama.tokenizers.train"):
        model = train_sentencepiece([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "tok", 400)
    assert model.is_file() and [r.getMessage() for r in caplog.records] == [
        f"skipping {tmp_path / 'a.txt'}:1: not valid utf-8 text (byte 0xe9 at column 4)",
        f"skipping {tmp_path / 'b.jsonl'}:1: the value of 'text' holds a lone surrogate \\ud800 at character 3, which "
        "no tokenizer can encode",
        f"skipping {tmp_path / 'b.jsonl'}:2: not a JSON object",
        "3 line(s) skipped: not valid UTF-8 text, text no tokenizer can encode, or not JSON objects"]
