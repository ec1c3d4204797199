"""Training-step speed of our single-rank model vs transformers.LlamaForCausalLM, in the same run.

    python -m benchmarks.model_step [--steps 4] [--threads N] [--compile]

Same shape, weights, batch, optimizer (torch AdamW), threads and precision for both; prints tokens/s,
the ratio ours / transformers, and MFU against a matmul peak measured here at the start.
Shape (from the model issue): 8 layers, hidden 512, 8 heads, 4 kv heads, intermediate 1408,
vocab 8192, seq 256, micro batch 8.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from neox_llama.convert.hf_names import copy_into_hf, hf_config_dict
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights

ARGS = LlamaArgs(num_layers=8, hidden_size=512, num_attention_heads=8, num_kv_heads=4, head_dim=64,
                 intermediate_size=1408, vocab_size=8192, max_position_embeddings=256, rotary_emb_base=500000.0)
SEQ, MICRO = 256, 8


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured GFLOP/s of a square matmul in ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_step() -> float:
    params = sum(p.numel() for p in build_model(ARGS, device="meta").parameters()) - ARGS.vocab_size * ARGS.hidden_size
    return MICRO * SEQ * (6 * params + 12 * ARGS.num_layers * ARGS.num_attention_heads * ARGS.head_dim * SEQ)


def time_steps(step, steps: int) -> float:
    step()  # warm-up (allocations, compilation)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = build_model(ARGS)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(ARGS), attn_implementation="sdpa"))
    copy_into_hf(hf, ours, ARGS)
    ids = torch.randint(0, ARGS.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    weights = token_weights(torch.ones(MICRO, SEQ), MICRO * SEQ)
    loss_fn = CausalLMLoss()
    forward = torch.compile(ours) if opts.compile else ours

    def make_step(model, run):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with precision_ctx():
                loss = run()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    print(f"threads {opts.threads}; shape: 8 layers, hidden 512, 8/4 heads, intermediate 1408, vocab 8192, "
          f"seq {SEQ}, micro batch {MICRO}; {flops_per_step() / 1e9:.1f} GFLOP per step")
    for label, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", torch.float32)):
        peak = matmul_peak(dtype)

        def precision_ctx(dtype=dtype):
            if dtype == torch.float32:
                return contextlib.nullcontext()
            return torch.autocast("cpu", dtype=dtype)

        ours_time = time_steps(make_step(ours, lambda: loss_fn(forward(inputs), (labels, weights))), opts.steps)
        hf_time = time_steps(make_step(hf, lambda: hf(input_ids=inputs, labels=inputs).loss), opts.steps)
        tokens = MICRO * SEQ
        mfu = flops_per_step() / ours_time / 1e9 / peak
        print(f"{label:14s} ours {tokens / ours_time:8.0f} tok/s | transformers {tokens / hf_time:8.0f} tok/s | "
              f"ratio {hf_time / ours_time:.2f}x | matmul peak {peak:.0f} GFLOP/s | our MFU {mfu:.1%}")


if __name__ == "__main__":
    main()
