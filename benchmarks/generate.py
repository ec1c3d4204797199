"""Decode speed: our generator with a KV cache vs transformers' generate on the same exported model, and vs
recomputing the whole sequence each step, in the same run with the same threads.

    python -m benchmarks.generate [--new-tokens 128]

The model has the model benchmark's shape (8 layers, hidden 512, GQA 8/4, vocab 8192), random weights,
fp32, built here and exported with tools/convert_to_hf.py's library. Target: ours / transformers >= 1.0.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.model_step import ARGS
from benchmarks.reference_generator import Generator
from neox_llama.convert.hf_names import copy_into_hf, hf_config_dict
from neox_llama.generation.settings import GenerationSettings
from neox_llama.model.llama import build_model


class _Checkpointless:
    """The little a Generator needs to know about a model when it does not come from a checkpoint."""

    def __init__(self):
        self.args, self.true_vocab, self.tokenizer = ARGS, ARGS.vocab_size, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    opts = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ARGS.__class__(**{**ARGS.__dict__, "max_position_embeddings": 1024})
    model = build_model(args).eval()
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(args), attn_implementation="sdpa")).eval()
    copy_into_hf(hf, model, args)
    info = _Checkpointless()
    info.args = args
    generator = Generator(model, info)
    prompt = torch.randint(0, args.vocab_size, (opts.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    settings = GenerationSettings(max_new_tokens=opts.new_tokens, stop_ids={-1})

    def timed(fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        return opts.new_tokens / (time.perf_counter() - start)

    ours = timed(lambda: generator.generate_ids(prompt, settings))
    theirs = timed(lambda: hf.generate(torch.tensor([prompt]), max_new_tokens=opts.new_tokens,
                                       min_new_tokens=opts.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0))
    no_cache = timed(lambda: generator.generate_ids(prompt, settings, use_cache=False))
    print(f"threads {torch.get_num_threads()}, prompt {opts.prompt_tokens} tokens, {opts.new_tokens} new tokens, greedy, fp32")
    print(f"ours with KV cache     {ours:8.1f} tok/s")
    print(f"transformers generate  {theirs:8.1f} tok/s   ours / transformers {ours / theirs:.2f}x (target >= 1.0)")
    print(f"ours without cache     {no_cache:8.1f} tok/s   cache speed-up {ours / no_cache:.2f}x")


if __name__ == "__main__":
    main()
