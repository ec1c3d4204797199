"""Key/value cache for generation: prefill once, then one token per step."""

from __future__ import annotations

import torch


class KVCache:
    """One attention layer's keys and values so far: [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.keys = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new positions; return all keys and values so far and the attention mask for the new ones
        (None when plain causal attention is right, or when one new position sees everything before it)."""
        new = k.shape[2]
        end = self.length + new
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; {end} requested")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        start, self.length = self.length, end
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if new == 1 or start == 0:
            return keys, values, None
        rows = torch.arange(new, device=k.device)[:, None] + start
        return keys, values, torch.arange(end, device=k.device)[None, :] <= rows
