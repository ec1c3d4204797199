"""This machine's matmul peak for MFU when ``peak_tflops`` is not configured: the datasheet's dense 16-bit figure
for known GPUs, otherwise measured."""

from __future__ import annotations

import time

import torch


def measure_matmul_tflops(dtype: torch.dtype, size: int = 1024, repeats: int = 8, device: str = "cpu",
                          tries: int = 1) -> float:
    """TFLOP/s of a square matmul in ``dtype`` with the current thread count, in about a quarter of a second per
    try; the best of ``tries`` (other load on the machine only ever slows a try down).

    A CPU without native bf16 (no AVX-512-BF16/AMX) emulates it at about 1 % of its fp32 speed, where one
    1024-square matmul takes seconds; a first timing at size 256 then picks a smaller size and fewer repeats.
    """

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    def timed(n: int, times: int) -> float:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        sync()
        start = time.perf_counter()
        for _ in range(times):
            a @ b
        sync()
        return 2 * n**3 * times / (time.perf_counter() - start)

    rough = max(timed(256, 2) for _ in range(3))  # FLOP/s, warm
    while size > 256 and rough * 0.25 < 2 * size**3:  # one matmul at `size` would take over a quarter second
        size //= 2
    times = max(2, min(repeats, int(0.25 * rough / (2 * size**3))))
    return max(timed(size, times) for _ in range(tries)) / 1e12


DENSE_16BIT_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""NVIDIA's dense (no sparsity) bf16/fp16 tensor-core peaks per GPU, by a substring of the device name (SXM unless
named; checked in this order)."""


def known_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak for a 16-bit ``dtype`` on a GPU named ``device_name``, or None (then measure it)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return next((peak for key, peak in DENSE_16BIT_TFLOPS.items() if key in device_name), None)
