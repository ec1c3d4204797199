"""Rotary position embeddings (RoPE), partial rotation, and the context-extension rules of transformers' Llama:
``linear`` (position interpolation), ``dynamic`` (NTK-aware base growth past the context), ``yarn``, ``longrope``
and ``llama3`` (Llama-3.1's frequency bands), each computed as transformers computes it (parity-tested)."""

from __future__ import annotations

import math

import torch
from torch import nn

ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
"""The ``rope_scaling.rope_type`` values."""


def _plain(rot_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rot_dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        attention = (mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
                     if s.get("mscale") and s.get("mscale_all_dim") else mscale(factor))

    def correction_dim(rotations: float) -> float:
        return (rot_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def inverse_frequencies(rot_dim: int, base: float, scaling: dict | None = None, *, context: int | None = None,
                        seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """theta_i = base^(-2i/rot_dim) rescaled by ``scaling`` (float32), and the factor cos and sin are multiplied by.

    ``context`` is the model's max_position_embeddings (``dynamic`` grows its base past it; ``longrope`` and
    ``yarn`` without ``factor`` derive it from it); ``seq_len`` the length being run (``dynamic``, ``longrope``).
    """
    if not scaling:
        return _plain(rot_dim, base), 1.0
    s, kind = dict(scaling), scaling.get("rope_type", "llama3")
    if kind == "llama3":
        return _llama3(_plain(rot_dim, base), s), 1.0
    if kind == "linear":
        return _plain(rot_dim, base) / s["factor"], 1.0
    if kind == "dynamic":
        length = max(seq_len or 0, context)
        grown = base * ((s["factor"] * length / context) - (s["factor"] - 1)) ** (rot_dim / (rot_dim - 2))
        return _plain(rot_dim, grown), 1.0
    if kind == "yarn":
        if s.get("factor") is None:
            s["factor"] = context / s["original_max_position_embeddings"]
        return _yarn(rot_dim, base, s)
    if kind == "longrope":
        original = s["original_max_position_embeddings"]
        factor = s.get("factor") or context / original
        attention = s.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = torch.tensor(s["long_factor"] if seq_len and seq_len > original else s["short_factor"],
                           dtype=torch.float32)
        shape = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
        return 1.0 / (ext * base**shape), float(attention)
    raise ValueError(f"unknown rope_type {kind!r}; valid types are {', '.join(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; the first ``rot_dim`` dimensions of each head are rotated.

    ``context``: the model's max_position_embeddings. With ``dynamic`` or ``longrope`` scaling the frequencies
    depend on the length being run (the largest position + 1), as in transformers.
    """

    def __init__(self, head_dim: int, base: float, rotary_pct: float = 1.0, scaling: dict | None = None,
                 context: int | None = None):
        super().__init__()
        self.rot_dim = int(head_dim * rotary_pct)
        self.base, self.scaling, self.context = base, scaling, context
        self.by_length = bool(scaling) and scaling.get("rope_type") in ("dynamic", "longrope")
        inv_freq, self.attention_factor = inverse_frequencies(self.rot_dim, base, scaling, context=context)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [batch, seq, rot_dim] for integer ``position_ids`` [batch, seq]."""
        inv_freq = self.inv_freq
        if self.by_length:
            inv_freq, _ = inverse_frequencies(self.rot_dim, self.base, self.scaling, context=self.context,
                                              seq_len=int(position_ids.max()) + 1)
        angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        angles = torch.cat((angles, angles), dim=-1)
        if self.attention_factor != 1.0:
            return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)
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
