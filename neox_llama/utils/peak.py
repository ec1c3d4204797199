"""Measuring this machine's matmul peak (for MFU when ``peak_tflops`` is not configured)."""

from __future__ import annotations

import time

import torch


def measure_matmul_tflops(dtype: torch.dtype, size: int = 1024, repeats: int = 8, device: str = "cpu") -> float:
    """TFLOP/s of a square matmul in ``dtype`` with the current thread count."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12
