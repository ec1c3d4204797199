"""Data loading cost vs a model step, and sample-index build time for 1e8 tokens, in the same run.

    python -m benchmarks.dataloader

Shape (the model benchmark's): seq 256, micro batch 8, 8 layers x hidden 512, vocab 8192, bf16 autocast.
Target: loading a batch takes <= 1% of a training step.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from benchmarks.model_step import ARGS, MICRO, SEQ
from neox_llama.data.gpt_dataset import GPTDataset, build_sample_index
from neox_llama.data.indexed import IndexedDatasetWriter
from neox_llama.data.loader import BatchMaker, PretrainingSampler
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss, token_weights


def main() -> None:
    rng = np.random.RandomState(0)
    sizes = rng.randint(50, 3000, size=70_000)  # ~1e8 tokens of documents
    start = time.perf_counter()
    _, _, shuffle = build_sample_index(sizes, 2048, None, seed=0)
    print(f"sample index for {sizes.sum():,} tokens ({len(shuffle):,} samples of 2048): "
          f"{time.perf_counter() - start:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        with IndexedDatasetWriter(f"{tmp}/d", np.uint16) as writer:
            for size in rng.randint(50, 3000, size=3000):
                writer.add_document(rng.randint(0, ARGS.vocab_size, size=size))
        ds = GPTDataset("train", f"{tmp}/d", (0, 3000), SEQ, 20_000, seed=0)
        sampler = PretrainingSampler(len(ds), 0, MICRO, 0, 1)
        maker = BatchMaker(eod_id=2, reset_position_ids=True, eod_mask_loss=True)
        batches = iter(sampler)
        n = 500
        start = time.perf_counter()
        for _ in range(n):
            batch = maker([ds[i] for i in next(batches)])
        load = (time.perf_counter() - start) / n

    model = build_model(ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = CausalLMLoss()
    weights = token_weights(batch["loss_mask"], batch["loss_mask"].sum())
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(batch["input_ids"], batch["position_ids"]), (batch["labels"], weights))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step = min(times[1:])
    print(f"batch of {MICRO} x {SEQ}: {MICRO / load:,.0f} samples/s loading ({load * 1e3:.2f} ms per batch); "
          f"model step {step * 1e3:.0f} ms; loading = {load / step:.2%} of a step (target <= 1%)")


if __name__ == "__main__":
    main()
