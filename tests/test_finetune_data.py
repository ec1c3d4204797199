"""Prompt styles (golden strings, Meta's reference token ids), instruction records, masks, splits, truncation,
padding and packing: everything between a JSON record and a training batch, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from helpers.assets import asset
from helpers.tokenizers import llama3_reference

from neox_llama.data.instruction import (
    InstructionDataError,
    InstructionDataset,
    load_records,
    split_records,
    tokenize,
    truncate,
)
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights
from neox_llama.tokenizers import TokenizerError, build_tokenizer
from neox_llama.tokenizers.prompts import Message, check_style, default_chat_style, encode_dialog, render_text

M = Message
CHAT = [M("system", "Be brief."), M("user", "Hi"), M("assistant", "Hello!"), M("user", "Bye"), M("assistant", "Bye!")]
GOLDEN = {
    "alpaca": "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye\n\n"
              "### Response:\nBye!</s>",
    "llama2-chat": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] Bye! </s>",
    "llama3-chat": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                   "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nBye!<|eot_id|>",
    "plain": "<s>Be brief.\nHi\nHello!</s>Bye\nBye!</s>",
}
OPEN = {  # the same conversation left open for the assistant's second answer
    "alpaca": GOLDEN["alpaca"].removesuffix("Bye!</s>"),
    "llama2-chat": GOLDEN["llama2-chat"].removesuffix(" Bye! </s>"),
    "llama3-chat": GOLDEN["llama3-chat"].removesuffix("Bye!<|eot_id|>"),
    "plain": GOLDEN["plain"].removesuffix("Bye!</s>"),
}
ALPACA_WITH_INPUT = ("<s>Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n"
                     "### Input:\n2 and 3\n\n### Response:\n5</s>")
ALPACA_NO_INPUT = ("<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\nAdd 2 and 3\n\n### Response:\n5</s>")


@pytest.mark.parametrize("style", list(GOLDEN))
def test_golden_strings_single_and_multi_turn(style):
    assert render_text(style, CHAT, open_turn=False) == GOLDEN[style]
    assert render_text(style, CHAT[:4], open_turn=True) == OPEN[style]


def test_alpaca_records_render_as_litgpt_alpaca():
    assert render_text("alpaca", [M("user", "Add", "2 and 3"), M("assistant", "5")], open_turn=False) == ALPACA_WITH_INPUT
    assert render_text("alpaca", [M("user", "Add 2 and 3"), M("assistant", "5")], open_turn=False) == ALPACA_NO_INPUT
    assert render_text("llama2-chat", [M("user", "Add", "2 and 3"), M("assistant", "5")],
                       open_turn=False) == "<s>[INST] Add\n\n2 and 3 [/INST] 5 </s>"


def test_llama2_chat_ids_are_metas_chat_completion():
    """Meta's llama/generation.py: each exchange is one encode of f"[INST] {u} [/INST] {a} " with BOS and EOS."""
    path = asset("spm-32k")
    tok, sp = build_tokenizer("SPMTokenizer", path), spm.SentencePieceProcessor(model_file=str(path))
    first = "<<SYS>>\nBe brief.\n<</SYS>>\n\nHi"
    expected = [1, *sp.encode(f"[INST] {first} [/INST] Hello! "), 2, 1, *sp.encode("[INST] Bye [/INST] Bye! "), 2]
    ids, trained = encode_dialog(tok, "llama2-chat", CHAT, open_turn=False)
    assert ids == expected
    prompt = [1, *sp.encode(f"[INST] {first} [/INST] Hello! "), 2, 1, *sp.encode("[INST] Bye [/INST]")]
    assert encode_dialog(tok, "llama2-chat", CHAT[:4], open_turn=True)[0] == prompt
    answers = [i for i, t in zip(ids, trained, strict=True) if t]
    # both answers (with the space Meta's format puts after each) and their EOS are trained
    assert sp.decode(answers).split() == ["Hello!", "Bye!"] and answers.count(2) == 2
    assert not any(trained[: len(sp.encode(f"[INST] {first} [/INST]")) + 1])


def test_llama3_chat_ids_are_metas_chat_format():
    """Meta's llama3 ChatFormat: BOS, per message header + encode(content.strip()) + <|eot_id|>, open header."""
    tok, ref = build_tokenizer("Llama3Tokenizer", asset("llama3-tokenizer")), llama3_reference()
    s = ref._special_tokens

    def header(role):
        return [s["<|start_header_id|>"], *ref.encode(role), s["<|end_header_id|>"], *ref.encode("\n\n")]

    expected = [s["<|begin_of_text|>"]]
    for m in CHAT:
        expected += header(m.role) + ref.encode(m.content.strip()) + [s["<|eot_id|>"]]
    ids, trained = encode_dialog(tok, "llama3-chat", CHAT, open_turn=False)
    assert ids == expected
    assert encode_dialog(tok, "llama3-chat", CHAT[:4], open_turn=True)[0] == expected[: -len(ref.encode("Bye!")) - 1]
    trained_ids = [i for i, t in zip(ids, trained, strict=True) if t]
    assert trained_ids == [*ref.encode("Hello!"), s["<|eot_id|>"], *ref.encode("Bye!"), s["<|eot_id|>"]]
    assert default_chat_style(tok) == "llama3-chat"


def test_styles_the_tokenizer_cannot_render_are_refused():
    tok = build_tokenizer("SPMTokenizer", asset("spm-32k"))
    assert default_chat_style(tok) == "llama2-chat"
    with pytest.raises(TokenizerError, match="llama3-chat needs the Llama-3 special tokens"):
        check_style("llama3-chat", tok)
    with pytest.raises(TokenizerError, match="unknown prompt style"):
        check_style("vicuna", tok)


def write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


@pytest.mark.parametrize(("record", "message"), [
    ({"instruction": "x"}, "record 1: field 'output' is missing"),
    ({"instruction": "x", "output": 3}, "record 1: field 'output' is a int"),
    ({"instruction": "x", "output": "y", "input": ["z"]}, "record 1: field 'input' is a list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "record 1: messages[1].role 'bot' is unknown"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "record 1: messages[1].content is missing"),
    ({"messages": [{"role": "user", "content": "a"}]}, "record 1: it ends with a user turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "record 1: message 0 has role 'assistant'"),
    ({"messages": []}, "record 1: 'messages' must be a non-empty list"),
    ("text", "record 1: a record must be an object"),
    ({"instruction": "a\ud800", "output": "b"},  # valid JSON ("\\ud800"), but no tokenizer can encode it
     "record 1: field 'instruction' holds a lone surrogate \\ud800 at character 2, which no tokenizer can encode"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\udc00"}]},
     "record 1: messages[1].content holds a lone surrogate \\udc00 at character 1"),
])
@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_bad_records_name_the_file_and_index(tmp_path, record, message, jsonl):
    path = write(tmp_path / "data.json", [{"instruction": "ok", "output": "fine"}, record], jsonl)
    with pytest.raises(InstructionDataError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_bad_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    with pytest.raises(InstructionDataError, match="line 2 is not valid JSON"):
        load_records(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(InstructionDataError, match="holds no records"):
        load_records(tmp_path / "b.json")
    with pytest.raises(InstructionDataError, match="not found"):
        load_records(tmp_path / "missing.json")


def test_records_of_both_kinds_load(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "input": "", "output": "b"},
                                        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                                      {"role": "assistant", "content": "v"}]}], jsonl=True)
    records, chat = load_records(path)
    assert chat and records[0] == [M("user", "a"), M("assistant", "b")] and records[1][0] == M("system", "s")


@pytest.mark.parametrize(("n", "fraction", "expected"), [(100, 0.05, 5), (10, 0.05, 1), (2, 0.05, 1), (2, 0.9, 1),
                                                        (1, 0.5, 0), (10, 0.0, 0), (40, 0.25, 10)])
def test_split_sizes(n, fraction, expected):
    train, valid = split_records(list(range(n)), fraction, seed=3)
    assert len(valid) == expected and len(train) == n - expected and sorted(train + valid) == list(range(n))


def test_split_is_deterministic_per_seed():
    records = list(range(50))
    assert split_records(records, 0.2, 1) == split_records(records, 0.2, 1)
    assert split_records(records, 0.2, 1)[1] != split_records(records, 0.2, 2)[1]


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_a_response_token():
    ids, trained = list(range(10)), [False] * 7 + [True] * 3
    assert truncate(ids, trained, 6, keep_first=True) == ([0, 5, 6, 7, 8, 9], [False, False, False, True, True, True])
    # a response longer than the limit: one id of context, then the response cut from the right
    ids, trained = list(range(10)), [False] * 2 + [True] * 8
    assert truncate(ids, trained, 4, keep_first=False) == ([1, 2, 3, 4], [False, True, True, True])
    assert truncate([5, 6, 7], [False, False, False], 10, keep_first=False) is None  # nothing to learn: dropped


def test_masks_train_every_assistant_turn_and_mask_prompt_false_trains_all(tmp_path):
    tok = build_tokenizer("SPMTokenizer", asset("spm-32k"))
    [masked] = tokenize([CHAT], tok, "llama2-chat", 512, True, "t")
    [unmasked] = tokenize([CHAT], tok, "llama2-chat", 512, False, "t")
    assert np.array_equal(masked.ids, unmasked.ids)
    assert tok.decode(masked.ids[masked.trained].tolist()).split() == ["Hello!", "Bye!"]
    assert unmasked.trained[1:].all() and not unmasked.trained[0]


def test_instruction_dataset_epochs_reshuffle_and_count():
    from neox_llama.data.instruction import Example

    examples = [Example(np.arange(3, 3 + k, dtype=np.int32), np.ones(k, dtype=bool)) for k in range(2, 9)]
    data = InstructionDataset("train", examples, seq_length=8, num_samples=20, seed=5, packing=False, pad_id=0)
    assert len(data) == 20 and data.epoch_starts[:3] == [0, 7, 14]
    assert [data.epoch_of(i) for i in (0, 6, 7, 13, 14, 19)] == [1, 1, 2, 2, 3, 3]
    first = [data.packs[i][0] for i in range(7)]
    second = [data.packs[i][0] for i in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second  # every record once per epoch
    packed = InstructionDataset("train", examples, seq_length=8, num_samples=10, seed=5, packing=True, pad_id=0)
    for pack in packed.packs:
        assert sum(len(examples[i].ids) for i in pack) <= 9


def tiny_model():
    args = LlamaArgs(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=48, vocab_size=64, max_position_embeddings=64, document_attention=True)
    torch.manual_seed(0)
    return build_model(args).eval()


def batch_loss(model, samples):
    batch = InstructionDataset.collate(samples)
    logits = model(batch["input_ids"], batch["position_ids"])
    weights = token_weights(batch["loss_mask"], batch["loss_mask"].sum())
    per_token = CausalLMLoss().factory.token_cross_entropy(logits, batch["labels"])
    return (CausalLMLoss()(logits, (batch["labels"], weights))).item(), per_token, batch["loss_mask"]


def test_padding_does_not_change_the_loss_and_packing_keeps_records_apart():
    from neox_llama.data.instruction import Example

    rng = np.random.RandomState(0)
    a = Example(rng.randint(1, 64, 9).astype(np.int32), np.array([False] * 4 + [True] * 5))
    b = Example(rng.randint(1, 64, 7).astype(np.int32), np.array([False] * 3 + [True] * 4))
    model = tiny_model()
    with torch.no_grad():
        exact = InstructionDataset("t", [a], seq_length=8, num_samples=1, seed=0, packing=False, pad_id=0)
        padded = InstructionDataset("t", [a], seq_length=30, num_samples=1, seed=0, packing=False, pad_id=0)
        loss_exact, _, _ = batch_loss(model, [exact[0]])
        loss_padded, _, _ = batch_loss(model, [padded[0]])
        assert abs(loss_exact - loss_padded) <= 1e-6
        packed = InstructionDataset("t", [a, b], seq_length=30, num_samples=1, seed=0, packing=True, pad_id=0)
        assert len(packed.packs[0]) == 2
        loss_packed, _, _ = batch_loss(model, [packed[0]])
        alone = InstructionDataset("t", [a, b], seq_length=30, num_samples=2, seed=0, packing=False, pad_id=0)
        loss_alone, _, _ = batch_loss(model, [alone[0], alone[1]])  # the same tokens, one record per row
        assert abs(loss_packed - loss_alone) <= 1e-6  # attention and positions stay within each record


def test_mask_prompt_false_still_truncates_by_the_response():
    tok = build_tokenizer("SPMTokenizer", asset("spm-32k"))
    record = [M("user", "word " * 60), M("assistant", "The answer is here.")]
    [example] = tokenize([record], tok, "alpaca", 24, False, "t")
    assert len(example.ids) == 25 and example.ids[0] == tok.bos_id
    assert tok.decode(example.ids.tolist()).endswith("The answer is here.")  # the prompt was cut, not the response
    assert example.trained[1:].all() and not example.trained[0]
