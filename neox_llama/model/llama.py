"""The Llama model, in the order a reader meets it in the paper (Touvron et al., 2023).

Normalisation (RMSNorm, or LayerNorm), rotary position embeddings with every context-extension rule of transformers'
Llama, causal grouped-query attention through torch's ``scaled_dot_product_attention`` (document masks, KV cache), the
SwiGLU (or GeLU) feed-forward network, the pre-norm block, the token embedding and the output head; then the layer
list and the model that runs it.

Between layers flows ``(hidden, position_ids)``; the final norm drops the positions and the head returns logits.
Every layer's ``forward`` is the only code that computes it: :class:`Llama` composes the layers for training,
evaluation, generation and serving, and DeepSpeed's ``PipelineModule`` composes the same layer classes when
pp > 1 (neox_llama/parallel/pipeline.py). Linear and embedding layers come from a :class:`LayerFactory`: plain
``nn.Linear`` on one device, one rank's shard under tensor parallelism. Adapters (LoRA, Adapter, Adapter v2)
attach to the built model from outside (neox_llama/peft/lora.py, adapter.py).

Global layer indices (stable; checkpoints and converters rely on them): ``0`` embedding, ``1..N`` blocks, ``N+1``
final norm, ``N+2`` head. Parameter names are ``{index}.{name}``: ``0.word_embeddings.weight``,
``3.attention.query.weight``, ``3.mlp.down.weight``, ``{N+1}.norm.weight``, ``{N+2}.head.weight``. With tied
embeddings the head owns no parameter: it reuses ``0.word_embeddings.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import SINGLE_DEVICE, LayerFactory
from neox_llama.model.init import init_weights

Activation = tuple[torch.Tensor, torch.Tensor]
"""What flows between layers: hidden states [batch, seq, hidden] and position ids [batch, seq]."""


# ----------------------------------------------------------------------------------------------- normalisation
class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and scaled by a learned weight (as Llama and Hugging Face do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The norm named by the config's ``norm`` key: ``rmsnorm`` or ``layernorm`` (weight and bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


# ------------------------------------------------------------------------------------------ rotary positions
ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
"""The ``rope_scaling.rope_type`` values, each computed as transformers computes it (parity-tested)."""


def _plain(rot_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama-3.1: long wavelengths stretched by ``factor``, short ones kept, the band between interpolated."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


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
    high += 0.001 if low == high else 0  # as transformers: no division by zero
    extrapolation = 1 - torch.clamp((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
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
    if kind == "linear":  # position interpolation
        return _plain(rot_dim, base) / s["factor"], 1.0
    if kind == "dynamic":  # NTK-aware base growth past the context
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
        exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
        return 1.0 / (ext * base**exponents), float(attention)
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
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the frequencies (they are not saved: after a meta-device build they must be)."""
        inv_freq, self.attention_factor = inverse_frequencies(self.rot_dim, self.base, self.scaling,
                                                              context=self.context)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [batch, seq, rot_dim] for integer ``position_ids`` [batch, seq]."""
        inv_freq = self.inv_freq
        if self.by_length:
            inv_freq, _ = inverse_frequencies(self.rot_dim, self.base, self.scaling, context=self.context,
                                              seq_len=int(position_ids.max()) + 1)
        angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


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


# ----------------------------------------------------------------------------------------------------- attention
class KVCache:
    """One attention layer's keys and values so far, [batch, kv_heads, capacity, head_dim]: prefill, then one token
    per step. Any object with this ``append`` serves (generation/batch.py keeps one slot per sequence)."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.keys = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new positions; return all keys and values so far and the attention mask for the new ones
        (None when plain causal attention is right, or when one new position sees everything before it)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; {end} requested")
        self.keys[:, :, start:end], self.values[:, :, start:end] = k, v
        self.length = end
        if k.shape[2] == 1 or start == 0:
            return self.keys[:, :, :end], self.values[:, :, :end], None
        rows = torch.arange(k.shape[2], device=k.device)[:, None] + start
        return self.keys[:, :, :end], self.values[:, :, :end], torch.arange(end, device=k.device)[None, :] <= rows


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask: causal, and only within the document (a new one starts at position 0)."""
    document = (position_ids == 0).cumsum(dim=-1)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]


class Attention(nn.Module):
    """Multi-head (num_kv_heads == heads), grouped-query or multi-query causal self-attention.

    Parameters: ``query`` [heads*head_dim, hidden], ``key``/``value`` [kv_heads*head_dim, hidden],
    ``dense`` [hidden, heads*head_dim] (Hugging Face q_proj, k_proj, v_proj, o_proj).
    """

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        self.head_dim = args.head_dim
        self.local_heads = args.num_attention_heads // factory.tp_size
        self.local_kv_heads = args.num_kv_heads // factory.tp_size
        bias = args.use_bias_in_attn_linear
        self.query = factory.column(args.hidden_size, args.num_attention_heads * args.head_dim, bias)
        self.key = factory.column(args.hidden_size, args.num_kv_heads * args.head_dim, bias)
        self.value = factory.column(args.hidden_size, args.num_kv_heads * args.head_dim, bias)
        self.dense = factory.row(args.num_attention_heads * args.head_dim, args.hidden_size, bias)
        self.dropout = args.attention_dropout
        self.document_attention = args.document_attention
        self.recompute = args.recompute_attention
        self.register_module("adapter", None)  # LLaMA-Adapter's gated prompt, when a run adds one (peft/adapter.py)
        self.rotary = None
        if args.pos_emb == "rotary":
            scaling = dict(args.rope_scaling) if args.rope_scaling else None
            self.rotary = RotaryEmbedding(args.head_dim, args.rotary_emb_base, args.rotary_pct, scaling,
                                          context=args.max_position_embeddings)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.query(x).view(batch, seq, self.local_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v, mask = cache.append(k, v)
            # no mask: causal over a prompt, or (one new position, the last one) attention to every cached position
            out = self._core(q, k, v, mask, causal=mask is None and seq > 1)
        elif self.recompute and self.training and torch.is_grad_enabled():
            # Selective checkpointing: keep only q, k, v; the mask, scores and softmax are rebuilt in backward (the
            # dropout mask too: checkpoint replays the RNG state).
            out = checkpoint(self._masked_core, q, k, v, position_ids, use_reentrant=False)
        else:
            out = self._masked_core(q, k, v, position_ids)
        if self.adapter is not None:
            out = out + self.adapter(q, self.key, self.value, self.local_kv_heads)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim))

    def _masked_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self._core(q, k, v, document_causal_mask(position_ids) if self.document_attention else None)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v over [batch, heads, seq, head_dim] (causal when there is no mask)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None if causal is None else causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.local_kv_heads != self.local_heads)


# ---------------------------------------------------------------------------------------------- feed-forward
class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; GeLU: ``down(gelu(up(x)))``. ``intermediate_size`` is the width
    of ``gate``/``up`` exactly as in Hugging Face (no 2/3 rule)."""

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        bias = args.use_bias_in_mlp
        self.swiglu = args.activation == "swiglu"
        if self.swiglu:
            self.gate = factory.column(args.hidden_size, args.intermediate_size, bias)
        self.up = factory.column(args.hidden_size, args.intermediate_size, bias)
        self.down = factory.row(args.intermediate_size, args.hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x)))


# ------------------------------------------------------------------------------------------------ the layers
class EmbeddingLayer(nn.Module):
    """Token ids (and optional position ids) -> hidden states. Also the tied output head (``as_head``)."""

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        self.factory = factory
        self.word_embeddings = factory.vocab_embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = None
        if args.pos_emb == "learned":
            self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> Activation:
        input_ids, position_ids = (inputs[0], inputs[1]) if isinstance(inputs, (tuple, list)) else (inputs, None)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(position_ids)
        return self.dropout(hidden), position_ids

    def as_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the embedding matrix (weight tying)."""
        return F.linear(self.factory.head_input(hidden), self.word_embeddings.weight)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        self.input_norm = make_norm(args.norm, args.hidden_size, args.norm_epsilon)
        self.attention = Attention(args, factory)
        self.post_attention_norm = make_norm(args.norm, args.hidden_size, args.norm_epsilon)
        self.mlp = MLP(args, factory)
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(self, inputs: Activation, cache: KVCache | None = None) -> Activation:
        hidden, position_ids = inputs
        hidden = hidden + self.dropout(self.attention(self.input_norm(hidden), position_ids, cache))
        hidden = hidden + self.dropout(self.mlp(self.post_attention_norm(hidden)))
        return hidden, position_ids


class FinalNorm(nn.Module):
    """The norm after the last block; drops the position ids."""

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        self.norm = make_norm(args.norm, args.hidden_size, args.norm_epsilon)

    def forward(self, inputs: Activation) -> torch.Tensor:
        return self.norm(inputs[0])


class HeadLayer(nn.Module):
    """Hidden states -> logits over the (padded, possibly rank-sharded) vocabulary."""

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        self.head = factory.column(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


class ScoreLayer(nn.Module):
    """A reward model's head: hidden states -> one score per position (``LlamaForSequenceClassification``'s
    ``score``, ``num_labels`` 1), replicated on tensor-parallel ranks; the score of a sequence is its last token's."""

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        self.score = nn.Linear(args.hidden_size, args.num_labels, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)


# ------------------------------------------------------------------------------------------------- the model
class _TiedForward(nn.Module):
    """Runs another layer's method (the tied head) without owning, or naming, its parameters."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered (and named) twice
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._owner[0], self.method)(x)


class Llama(nn.Module):
    """Embedding, blocks, final norm and head, registered under their global index and run in order.

    ``checkpoint_every`` > 0 recomputes each group of that many transformer blocks in backward.
    """

    def __init__(self, args: LlamaArgs, factory: LayerFactory = SINGLE_DEVICE, checkpoint_every: int = 0):
        super().__init__()
        embedding = EmbeddingLayer(args, factory)
        blocks = [TransformerBlock(args, factory) for _ in range(args.num_layers)]
        if args.num_labels:
            head = ScoreLayer(args, factory)
        else:
            head = _TiedForward(embedding, "as_head") if args.tie_embeddings else HeadLayer(args, factory)
        layers = [embedding, *blocks, FinalNorm(args, factory), head]
        for index, layer in enumerate(layers):
            self.add_module(str(index), layer)
        self.checkpoint_every = checkpoint_every

    def blocks(self) -> list[TransformerBlock]:
        return [layer for layer in self.children() if isinstance(layer, TransformerBlock)]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: Sequence[KVCache] | None = None, *, last_only: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab] (a reward model: scores [batch, seq, 1]) for ``input_ids`` [batch, seq] at
        ``position_ids`` (default 0, 1, ...).

        ``cache``: one KV cache per block (generation: the blocks read and extend it); ``last_only``: the logits of
        the last position only ([batch, 1, vocab]; the final norm and head run on that position alone).
        """
        layers, blocks = list(self.children()), self.blocks()
        if cache is not None and len(cache) != len(blocks):
            raise ValueError(f"{len(cache)} KV caches for {len(blocks)} blocks")
        x = layers[0]((input_ids, position_ids))
        if cache is not None:
            for block, block_cache in zip(blocks, cache, strict=True):
                x = block(x, block_cache)
        elif self.checkpoint_every and self.training:
            for start in range(0, len(blocks), self.checkpoint_every):
                x = checkpoint(_run_group, blocks[start:start + self.checkpoint_every], *x, use_reentrant=False)
        else:
            for block in blocks:
                x = block(x)
        if last_only:
            x = (x[0][:, -1:], x[1])
        return layers[-1](layers[-2](x))

    def new_cache(self, batch: int, capacity: int) -> list[KVCache]:
        """Empty KV caches (one per block) for ``batch`` sequences of up to ``capacity`` positions."""
        attention, weight = self.blocks()[0].attention, next(self.parameters())
        return [KVCache(batch, attention.local_kv_heads, capacity, attention.head_dim, weight.dtype, weight.device)
                for _ in self.blocks()]


def _run_group(group: list[nn.Module], hidden: torch.Tensor, position_ids: torch.Tensor) -> Activation:
    x = (hidden, position_ids)
    for layer in group:
        x = layer(x)
    return x


def build_model(args: LlamaArgs, factory: LayerFactory = SINGLE_DEVICE, *, checkpoint_every: int = 0,
                device: torch.device | str | None = None, initialize: bool = True) -> Llama:
    """The whole model on this rank, initialised from ``args.seed`` independently of the layout.

    ``device="meta"`` builds it without memory (for counting); it is then not initialised.
    """
    with torch.device(device or "cpu"):
        model = Llama(args, factory, checkpoint_every)
    if initialize and str(device) != "meta":
        for index, layer in model.named_children():
            init_weights(layer, int(index), args)
    return model
