#!/usr/bin/env python
"""Serve a checkpoint (and LoRA / Adapter / Adapter v2 adapters of it) over an OpenAI-compatible HTTP API.

    python tools/serve.py --checkpoint runs/local/checkpoints --port 8000
    python tools/serve.py --checkpoint BASE --adapter alpaca=runs/lora/checkpoints --adapter chat=runs/chat/global_step300

Endpoints: GET /v1/models, POST /v1/completions (echo and logprobs for scoring, as lm-eval's local-completions
sends them), POST /v1/chat/completions (logprobs, top_logprobs; stream: true for server-sent events), POST /tokenize,
POST /detokenize, GET /tokenizer_info (vLLM's shapes), GET /health. A request without "model" goes to the base (named by --name). Requests that arrive together are
decoded together (continuous batching, up to --max-batch-size at once), whatever adapter each one uses; the base
weights are loaded once. A request body over --max-request-bytes is answered 413 before it is parsed or tokenized.
Ctrl-C or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

import torch

from neox_llama.cli.runner import command
from neox_llama.errors import NeoxLlamaError
from neox_llama.tokenizers.prompts import STYLES, check_style, default_chat_style
from neox_llama.utils.logging_setup import setup_logging

logger = logging.getLogger("neox_llama.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="save directory (uses latest) or global_stepN folder; a "
                                                            "LoRA checkpoint is served merged into its base, an Adapter one "
                                                            "attached to it")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter checkpoint (LoRA, Adapter, Adapter v2) trained on --checkpoint, served "
                             "as model NAME (repeatable); requests for different adapters decode together")
    parser.add_argument("--base", help="an adapter --checkpoint's base, when it is no longer where its metadata says")
    parser.add_argument("--name", default="base", help="the model name of --checkpoint (default: base)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="sequences decoded at once (each holds a KV cache of --max-context positions)")
    parser.add_argument("--max-context", type=int,
                        help="prompt + answer length per sequence (default: the model's max_position_embeddings)")
    parser.add_argument("--prompt-style", choices=STYLES,
                        help="chat template of the base for /v1/chat/completions; default: the one it was trained "
                             "with, else the model family's (adapters use their own)")
    parser.add_argument("--max-request-bytes", type=int, metavar="BYTES",
                        help="larger request bodies are answered 413 before they are parsed or tokenized (default: "
                             "16 bytes per position of --max-context, at least 1 MiB)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on a GPU that has it, else float32")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    if args.max_context is not None and args.max_context < 2:
        parser.error("--max-context must be at least 2")
    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be at least 1")
    if not 0 < args.port < 65536:
        parser.error("--port must be in 1..65535")
    args.adapters = {}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--adapter {item!r}: expected NAME=DIR")
        if name in args.adapters or name == args.name:
            parser.error(f"--adapter {item!r}: the model name {name!r} is used twice")
        args.adapters[name] = folder
    return args


def _port_problem(host: str, port: int) -> str | None:
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as err:
        return f"cannot listen on {host}:{port} ({err.strerror or err})"


def load_service(args: argparse.Namespace):
    """The model, its adapters and the engine, ready for :func:`neox_llama.serving.app.build_app`."""
    from neox_llama.generation.adapter_bank import AdapterBank
    from neox_llama.generation.language_model import LanguageModel
    from neox_llama.serving.app import ServedModel, Service
    from neox_llama.serving.engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise NeoxLlamaError("--device cuda: no GPU is visible")
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None)
    lm = LanguageModel.from_checkpoint(args.checkpoint, base=args.base, device=device, dtype=dtype)
    lm.require_language_model("serve completions")
    if lm.tokenizer is None:
        raise NeoxLlamaError(f"{args.checkpoint}: the checkpoint has no tokenizer to turn text into ids")
    if args.max_context is not None and args.max_context > lm.max_length:
        raise NeoxLlamaError(f"--max-context {args.max_context}: the model's context is {lm.max_length}")
    bank = AdapterBank.attach(lm, args.adapters) if args.adapters else None
    base_style = args.prompt_style or lm.run.prompt_style or default_chat_style(lm.tokenizer)
    check_style(base_style, lm.tokenizer)
    models = [ServedModel(args.name, 0, base_style)]
    for k, name in enumerate(args.adapters, start=1):
        style = bank.prompt_style(k) or base_style
        check_style(style, lm.tokenizer)
        models.append(ServedModel(name, k, style))
    engine = Engine(lm, args.max_batch_size, args.max_context)
    kv = sum(c.keys.numel() * c.keys.element_size() * 2 for c in engine.batch.caches) / 2**20
    logger.info("%s on %s: %d decoding slots x %d positions (KV cache %.1f MiB)", ", ".join(m.name for m in models),
                device, args.max_batch_size, engine.batch.capacity, kv)
    return Service(engine, models)


@command("serve.py")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    problem = _port_problem(args.host, args.port)
    if problem:
        raise NeoxLlamaError(problem)
    service = load_service(args)
    import uvicorn

    from neox_llama.serving.app import build_app
    from neox_llama.serving.limits import default_max_request_bytes

    limit = args.max_request_bytes or default_max_request_bytes(service.engine.batch.capacity)
    logger.debug("request bodies up to %d bytes", limit)
    logger.info("serving on http://%s:%d/v1 (Ctrl-C to stop)", args.host, args.port)
    config = uvicorn.Config(build_app(service, limit), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level == "debug", log_config=None, timeout_graceful_shutdown=5)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it found; with
    # these the process ends with "stopped" and exit status 0 instead of dying of the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    logger.info("stopped")
    return 0


console_main = main  # neox-serve


if __name__ == "__main__":
    sys.exit(main())
