#!/usr/bin/env python
"""Generate text from a neox_llama checkpoint (KV cache; greedy or sampled; streaming; chat).

    python tools/generate.py --checkpoint runs/local/checkpoints --prompt "ROMEO:" --max-new-tokens 64
    python tools/generate.py --checkpoint DIR --prompts-file prompts.txt --temperature 0.8 --top-p 0.9
    python tools/generate.py --checkpoint DIR --chat [--system "You are terse."]
    python tools/generate.py --checkpoint BASE --adapter runs/lora/global_step600 --chat

--adapter applies an adapter checkpoint: LoRA merged at load exactly as tools/merge_lora.py merges it, Adapter or
Adapter v2 attached as modules (their prompts cannot be merged); an adapter checkpoint given as --checkpoint alone
finds its base through its metadata. --chat is a multi-turn loop on stdin in the
checkpoint's prompt style (/reset forgets the history, /exit or end of input leaves).

The sampling flags follow the server's rules, in the same words (neox_llama/generation/settings.py): --temperature
in [0, 2], --top-p in (0, 1], --top-k and --max-new-tokens at least 1, and a --max-new-tokens that does not fit
into the context after a prompt is an error naming both (without the flag, 64 cut to what the context leaves).
"""

from __future__ import annotations

import argparse
import sys

from neox_llama.cli.runner import command
from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.language_model import LanguageModel
from neox_llama.generation.settings import GenerationSettings, check_new_tokens, check_prompt_length, check_sampling
from neox_llama.serving.text import TextStream
from neox_llama.tokenizers.prompts import STYLES, Message, check_style, default_chat_style, encode_dialog, stop_ids
from neox_llama.tokenizers.text import USER_TEXT_ERRORS, usable_text
from neox_llama.utils.logging_setup import setup_logging

DEFAULT_NEW_TOKENS = 64
"""New tokens per answer without --max-new-tokens (cut to what the context leaves)."""
FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
         "max_new_tokens": "--max-new-tokens"}
"""The shared sampling rules' names for this command's flags (the server names its fields)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="save directory (uses latest) or global_stepN folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="ADAPTER_CHECKPOINT",
                        help="an adapter checkpoint trained on --checkpoint: LoRA (merged in at load; repeatable), "
                             "Adapter or Adapter v2 (attached; one)")
    parser.add_argument("--base", help="an adapter --checkpoint's base, when it is no longer where its metadata says")
    parser.add_argument("--prompt-style", choices=STYLES,
                        help="chat template for --chat; default: the one the checkpoint/adapter was trained with, "
                             "else the model family's")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text to continue")
    source.add_argument("--prompts-file", help="one prompt per line; each is generated in turn")
    source.add_argument("--chat", action="store_true", help="interactive multi-turn chat (reads stdin)")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"new tokens per answer, at most what the context leaves after the prompt (an error "
                             f"beyond it); default: {DEFAULT_NEW_TOKENS}, cut to what the context leaves")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); at most 2")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens (at least 1)")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this much "
                                                    "probability, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    args = parser.parse_args(argv)
    check_sampling(args.temperature, args.top_p, args.top_k, args.max_new_tokens, FLAGS)  # before loading anything
    return args


def check_room(generator: LanguageModel, ids: list[int], max_new_tokens: int | None) -> None:
    """The prompt fits into the context, and so does an asked-for --max-new-tokens after it (the server's rule)."""
    check_prompt_length(len(ids), generator.max_length)
    if max_new_tokens is not None:
        check_new_tokens(max_new_tokens, len(ids), generator.max_length, FLAGS["max_new_tokens"])


def stream(generator: LanguageModel, prompt_ids: list[int], settings: GenerationSettings,
           continues_prompt: bool = False) -> str:
    """Print the answer as it is generated (never half a character); ``continues_prompt``: the answer is the text
    its ids add after the prompt's (a leading space kept), else the text of its ids alone (a chat answer)."""
    text = TextStream(generator.tokenizer, [], context=prompt_ids if continues_prompt else ())

    def show(token: int) -> None:
        if delta := text.push(token):
            sys.stdout.write(delta)
            sys.stdout.flush()

    generator.generate_one(prompt_ids, settings, on_token=show)
    sys.stdout.write(text.finish() + "\n")
    sys.stdout.flush()
    return text.text


@command("generate.py")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("warning")
    generator = LanguageModel.from_checkpoint(args.checkpoint, adapters=args.adapter, base=args.base, device=args.device)
    generator.require_language_model("generate text")
    if generator.tokenizer is None:
        raise NeoxLlamaError("the checkpoint has no tokenizer to turn text into ids")
    settings = GenerationSettings(args.max_new_tokens or DEFAULT_NEW_TOKENS, args.temperature, args.top_k,
                                  args.top_p, args.seed, stop_strings=args.stop)
    tok = generator.tokenizer
    if args.prompt is not None or args.prompts_file:
        prompts = [usable_text(args.prompt)] if args.prompt is not None else _read_prompts(args.prompts_file)
        if args.prompt_style:
            check_style(args.prompt_style, tok)
            settings.stop_ids = stop_ids(tok, args.prompt_style)
        encoded = []
        for prompt in prompts:
            if args.prompt_style:  # the prompt as one user turn of the style, answered by the model
                ids, _ = encode_dialog(tok, args.prompt_style, [Message("user", prompt)], open_turn=True)
            else:
                ids = tok.encode_document(prompt)  # the start-token policy (see Tokenizer.starts_with_bos)
            check_room(generator, ids, args.max_new_tokens)  # every prompt, before the first answer
            encoded.append(ids)
        for prompt, ids in zip(prompts, encoded, strict=True):
            if not args.prompt_style:
                sys.stdout.write(prompt)
            stream(generator, ids, settings, continues_prompt=not args.prompt_style)
        return 0
    style = args.prompt_style or generator.run.prompt_style or default_chat_style(tok)
    check_style(style, tok)
    return chat(generator, style, settings, args.system, args.max_new_tokens)


def chat(generator: LanguageModel, style: str, settings: GenerationSettings, system: str | None,
         max_new_tokens: int | None = None) -> int:
    """The multi-turn loop: every answer sees the whole history, rendered in ``style``; a turn whose history no
    longer leaves room for an asked-for ``max_new_tokens`` is an error (as a prompt too long for the context)."""
    tok = generator.tokenizer
    settings.stop_ids = stop_ids(tok, style)
    history: list[Message] = [Message("system", system)] if system else []
    start = len(history)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8 is repaired with U+FFFD, not fatal
        sys.stdin.reconfigure(errors=USER_TEXT_ERRORS)
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = usable_text(sys.stdin.readline())
        if not line:
            return 0
        message = line.rstrip("\n")
        if message.strip() == "/exit":
            return 0
        if message.strip() == "/reset":
            del history[start:]
            sys.stdout.write("(history cleared)\n")
            continue
        if not message.strip():
            continue
        history.append(Message("user", message))
        ids, _ = encode_dialog(tok, style, history, open_turn=True)
        check_room(generator, ids, max_new_tokens)
        if not interactive:
            sys.stdout.write(f">>> {message}\n")
        answer = stream(generator, ids, settings)
        history.append(Message("assistant", answer.strip()))


def _read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of ``path`` (UTF-8; a byte that is not is repaired with U+FFFD)."""
    try:
        with open(path, encoding="utf-8", errors=USER_TEXT_ERRORS) as handle:
            return [usable_text(line.rstrip("\n")) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise NeoxLlamaError(f"--prompts-file {path}: cannot read it ({err})") from None


console_main = main  # neox-generate


if __name__ == "__main__":
    sys.exit(main())
