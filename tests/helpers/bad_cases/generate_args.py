"""Bad sampling flags of tools/generate.py: refused with the server's words (neox_llama/generation/settings.py is
the one place of the rules), the flag in place of the request field. tests/test_serve.py sends the same values
to the server and expects the same messages with the field's name (:data:`SAME_AS_SERVER`)."""

from __future__ import annotations

from helpers.bad_inputs import tool
from neox_llama.tokenizers import build_tokenizer

SAME_AS_SERVER = {  # case -> (request field, flag, value in JSON, value on the command line, message; {}: the name)
    "negative_temperature": ("temperature", "--temperature", "-1", "-1",
                             "{} must be between 0 and 2 (0: greedy), got -1"),
    "nan_temperature": ("temperature", "--temperature", "NaN", "nan",
                        "{} is NaN, not a number; it must be between 0 and 2 (0: greedy)"),
    "top_p_zero": ("top_p", "--top-p", "0", "0", "{} must be in (0, 1], got 0"),
    "top_p_above_one": ("top_p", "--top-p", "1.5", "1.5", "{} must be in (0, 1], got 1.5"),
    "top_k_zero": ("top_k", "--top-k", "0", "0", "{} must be at least 1 (leave it out to sample from every token), got 0"),
    "no_new_tokens": ("max_tokens", "--max-new-tokens", "0", "0", "{} must be at least 1, got 0"),
}
ROOM = "the prompt has {} tokens and {} is 100000, but the context holds {} (at most {} new tokens)"
"""The message for 100000 new tokens after a prompt of some length (the server's max_tokens, our flag)."""
PROMPT = "ROMEO:"


def _refused(world, case: str):
    _field, flag, _json, value, message = SAME_AS_SERVER[case]
    return tool("generate.py", "--checkpoint", world["w"] / "run/ck", "--prompt", PROMPT, flag, value), \
        "generate.py: error: " + message.format(flag), []


def case_generate_args_negative_temperature(world, tmp_path):
    return _refused(world, "negative_temperature")


def case_generate_args_nan_temperature(world, tmp_path):
    return _refused(world, "nan_temperature")


def case_generate_args_top_p_zero(world, tmp_path):
    return _refused(world, "top_p_zero")


def case_generate_args_top_p_above_one(world, tmp_path):
    return _refused(world, "top_p_above_one")


def case_generate_args_top_k_zero(world, tmp_path):
    return _refused(world, "top_k_zero")


def case_generate_args_no_new_tokens(world, tmp_path):
    return _refused(world, "no_new_tokens")


def case_generate_args_max_new_tokens_beyond_the_context(world, tmp_path):
    n = len(build_tokenizer("SPMTokenizer", world["tok"]).encode_document(PROMPT))
    proc = tool("generate.py", "--checkpoint", world["w"] / "run/ck", "--prompt", PROMPT, "--max-new-tokens", "100000")
    assert proc.stdout == "", proc.stdout  # refused before anything was generated
    return proc, "generate.py: error: " + ROOM.format(n, "--max-new-tokens", 256, 256 - n), []


def case_generate_args_max_new_tokens_beyond_the_context_of_a_later_prompt(world, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\n" + "word " * 30 + "\n")  # the first fits 240 new tokens, the second does not
    tok = build_tokenizer("SPMTokenizer", world["tok"])
    first, n = len(tok.encode_document("x")), len(tok.encode_document("word " * 30))
    assert first + 240 <= 256 < n + 240, (first, n)
    proc = tool("generate.py", "--checkpoint", world["w"] / "run/ck", "--prompts-file", prompts, "--max-new-tokens", "240")
    assert proc.stdout == "", proc.stdout  # every prompt is checked before the first answer
    return proc, f"the prompt has {n} tokens and --max-new-tokens is 240, but the context holds 256", []
