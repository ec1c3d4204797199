"""The HF export carries its prompt style as a chat template: ``apply_chat_template`` gives exactly our prompt ids,
and ``convert_from_hf.py`` reads a known template back into ``prompt_style`` (and says when it cannot)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers  # a pinned requirement: fail, never skip, without it
from helpers import inprocess
from helpers.assets import asset
from helpers.checkpoints import TINY, save_random_checkpoint

from neox_llama.checkpoint.metadata import read_metadata, write_metadata
from neox_llama.convert.chat_template import recognise
from neox_llama.convert.hf_tokenizer_export import write_tokenizer_files
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.prompts import Message, encode_dialog

CONVERSATIONS = [  # (messages, open turn): a system message, several turns, whitespace the styles strip or keep
    ([Message("system", "You are a pirate.  "), Message("user", "Hi there!"), Message("assistant", " Arr, hello. "),
      Message("user", "Name 3 colours\nplease")], True),
    ([Message("user", "What is 2+2?"), Message("assistant", "4"), Message("user", "  And 3+3 ?\n")], True),
    ([Message("system", "Answer in French."), Message("user", "東京 café"), Message("assistant", "d'accord\n\n"),
      Message("user", "digits 1234567890"), Message("assistant", "ok")], False),
]
CASES = [("spm-32k", "SPMTokenizer", "alpaca"), ("spm-32k", "SPMTokenizer", "llama2-chat"), ("spm-32k", "SPMTokenizer", "plain"),
         ("llama3-tokenizer", "Llama3Tokenizer", "llama3-chat"), ("llama3-tokenizer", "Llama3Tokenizer", "alpaca")]


def hf_ids(hf, messages, open_turn):
    chat = [{"role": m.role, "content": m.content} for m in messages]
    out = hf.apply_chat_template(chat, add_generation_prompt=open_turn, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize(("kind", "tokenizer_type", "style"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_apply_chat_template_gives_our_prompt_ids(tmp_path, kind, tokenizer_type, style):
    tokenizer = build_tokenizer(tokenizer_type, asset(kind))
    write_tokenizer_files(tokenizer, tmp_path, style)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (tmp_path / "chat_template.jinja").read_text()  # what transformers 4 and 5 read
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.chat_template == config["chat_template"]
    for messages, open_turn in CONVERSATIONS:
        ours, _ = encode_dialog(tokenizer, style, messages, open_turn=open_turn)
        assert hf_ids(hf, messages, open_turn) == ours, (style, messages)
    assert recognise(config["chat_template"], config["bos_token"], config["eos_token"]) == style
    with pytest.raises(Exception, match="user and assistant turns alternating"):  # as encode_dialog refuses it
        hf.apply_chat_template([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])


META_LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_templates_are_recognised_by_what_they_render():
    # Meta's Llama-3-Instruct template renders as llama3-chat; a template of another format, or a broken one, is
    # none of ours.
    assert recognise(META_LLAMA3, "<|begin_of_text|>", "<|end_of_text|>") == "llama3-chat"
    assert recognise("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}", "<s>", "</s>") is None
    assert recognise("{% for m in messages %}", "<s>", "</s>") is None


def test_export_writes_the_template_and_import_reads_the_style_back(tmp_path):
    checkpoint = tmp_path / "ours" / "global_step1"
    save_random_checkpoint(checkpoint, TINY, tokenizer_type="SPMTokenizer", tokenizer_file=asset("spm-32k"))
    write_metadata(checkpoint, dataclasses.replace(read_metadata(checkpoint), prompt_style="llama2-chat"))
    proc = inprocess.tool("convert_to_hf.py", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert "chat template: prompt style llama2-chat" in proc.stderr
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer = build_tokenizer("SPMTokenizer", asset("spm-32k"))
    messages, open_turn = CONVERSATIONS[0]
    assert hf_ids(hf, messages, open_turn) == encode_dialog(tokenizer, "llama2-chat", messages, open_turn=True)[0]
    (tmp_path / "no_style").mkdir()
    write_tokenizer_files(tokenizer, tmp_path / "no_style")  # a checkpoint without a prompt style: no template
    assert "chat_template" not in json.loads((tmp_path / "no_style" / "tokenizer_config.json").read_text())
    assert not (tmp_path / "no_style" / "chat_template.jinja").exists()

    proc = inprocess.tool("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr
    assert "chat template is prompt style llama2-chat" in proc.stderr
    assert read_metadata(tmp_path / "back" / "global_step0").prompt_style == "llama2-chat"

    (tmp_path / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc = inprocess.tool("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "other"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "chat template" in line]
    assert len(lines) == 1 and "chat template not recognised as one of our prompt styles; prompt_style stays unset" \
        in lines[0], proc.stderr
    assert read_metadata(tmp_path / "other" / "global_step0").prompt_style is None
