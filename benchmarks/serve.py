"""Serving throughput: tools/serve.py under 1, 4 and 16 concurrent streaming clients, against the same requests sent
one after another, in the same run.

    python -m benchmarks.serve [--requests 16] [--max-tokens 64]

The model has the model benchmark's shape (8 layers, hidden 512, GQA 8/4, intermediate 1408) with the demo's
sentencepiece tokenizer (vocabulary 2048; run `python tools/prepare_data.py` or `make demo` first), random fp32
weights, context 1024. Every request is a 32-token prompt answered greedily with exactly --max-tokens tokens
(ignore_eos), streamed; time to first token is measured at the first text chunk. Printed per concurrency:
requests/s, generated tokens/s, mean time to first token, and throughput against one client at a time; and the
same requests generated in-process one after another (LanguageModel.generate_one, no HTTP), for the server's
overhead.
Target: 16 clients >= 3x one client's generated tokens/s (continuous batching shares each step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import yaml

from benchmarks.model_step import ARGS
from neox_llama.checkpoint.metadata import Layout, Metadata, write_metadata
from neox_llama.checkpoint.paths import layer_file
from neox_llama.checkpoint.weights import write_layer_file
from neox_llama.config import load_config
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.planning.launch import free_port
from neox_llama.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer" / "shakespeare_bpe.model"


def write_checkpoint(folder: Path) -> None:
    """A checkpoint of the benchmark shape with random weights and the demo tokenizer."""
    folder.mkdir(parents=True)
    (folder / TOKENIZER.name).write_bytes(TOKENIZER.read_bytes())
    raw = yaml.safe_load((ROOT / "configs" / "llama2" / "tiny.yml").read_text())
    raw.update(num_layers=ARGS.num_layers, hidden_size=ARGS.hidden_size, num_attention_heads=ARGS.num_attention_heads,
               num_kv_heads=ARGS.num_kv_heads, intermediate_size=ARGS.intermediate_size, seq_length=256,
               max_position_embeddings=1024, vocab_file=TOKENIZER.name, precision="fp32")
    (folder / "config.yml").write_text(yaml.safe_dump(raw))
    vocab = build_tokenizer("SPMTokenizer", TOKENIZER).vocab_size
    cfg = load_config([folder / "config.yml"], [f"vocab_file={folder / TOKENIZER.name}"], apply_presets=False,
                      tokenizer_vocab=vocab)
    torch.manual_seed(0)
    model = build_model(LlamaArgs.from_config(cfg))
    for index, layer in model.named_children():
        tensors = {n: p.detach().clone() for n, p in layer.named_parameters()}
        if tensors:
            write_layer_file(layer_file(folder, int(index)), tensors)
    write_metadata(folder, Metadata(tag="benchmark", layout=Layout(zero_stage=0), tokenizer_files=[TOKENIZER.name]))


def one_request(url: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text chunk, total seconds, generated tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return first if first is not None else total, total, tokens


def measure(url: str, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "wall": wall, "req_per_s": len(prompts) / wall, "tok_per_s": tokens / wall,
            "ttft": statistics.mean(r[0] for r in results), "tokens": tokens}


def in_process(folder: Path, prompts: list[list[int]], max_tokens: int) -> float:
    """Generated tokens/s of the same requests one after another in this process (no HTTP), for the overhead."""
    from neox_llama.generation.language_model import LanguageModel
    from neox_llama.generation.settings import GenerationSettings

    lm = LanguageModel.from_checkpoint(str(folder), device="cpu")
    settings = GenerationSettings(max_new_tokens=max_tokens, stop_ids={-1})
    lm.generate_one(prompts[0], GenerationSettings(max_new_tokens=4, stop_ids={-1}))
    start = time.perf_counter()
    tokens = sum(len(lm.generate_one(p, settings)) for p in prompts)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    opts = parser.parse_args()
    if not TOKENIZER.is_file():
        raise SystemExit(f"{TOKENIZER}: missing; run `python tools/prepare_data.py` (or make demo) first")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 2048, (32,), generator=gen).tolist() for _ in range(opts.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / "ck")
        port = free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), "--checkpoint", str(Path(tmp) / "ck"),
                                   "--port", str(port), "--max-batch-size", "16", "--log-level", "warning"], cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            one_request(url, prompts[0], 4)  # warm-up
            rows = [measure(url, prompts, clients, opts.max_tokens) for clients in (1, 4, 16)]
            direct = in_process(Path(tmp) / "ck", prompts, opts.max_tokens)
        finally:
            server.terminate()
            server.wait(30)
    base = rows[0]["tok_per_s"]
    print(f"threads {torch.get_num_threads()}, {opts.requests} requests of 32 prompt tokens -> {opts.max_tokens} "
          "new tokens, greedy, fp32, streamed")
    print("clients  requests/s  gen tok/s  mean TTFT s  vs 1 client")
    for r in rows:
        print(f"{r['clients']:7d}  {r['req_per_s']:10.2f}  {r['tok_per_s']:9.1f}  {r['ttft']:11.3f}  "
              f"{r['tok_per_s'] / base:10.2f}x")
    print(f"in-process, one after another (no HTTP): {direct:.1f} gen tok/s; the server with 1 client reaches "
          f"{base / direct:.2f} of it")
    print(f"target: 16 clients >= 3x one client's generated tokens/s -> {rows[-1]['tok_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
