"""Rotary position embeddings (RoPE), with Llama-3.1 frequency scaling and partial rotation."""

from __future__ import annotations

import math

import torch
from torch import nn


def inverse_frequencies(rot_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/rot_dim), optionally rescaled by the Llama-3.1 rule (float32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; the first ``rot_dim`` dimensions of each head are rotated."""

    def __init__(self, head_dim: int, base: float, rotary_pct: float = 1.0, scaling: dict | None = None):
        super().__init__()
        self.rot_dim = int(head_dim * rotary_pct)
        self.base, self.scaling = base, scaling
        self.register_buffer("inv_freq", inverse_frequencies(self.rot_dim, base, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [batch, seq, rot_dim] for integer ``position_ids`` [batch, seq]."""
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, seq, head_dim] by the angles of ``cos``/``sin`` [batch, seq, rot_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((rotated * cos + _rotate_half(rotated) * sin, passed), dim=-1)
