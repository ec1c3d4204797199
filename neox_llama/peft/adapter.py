"""LLaMA-Adapter (Zhang et al., 2023) and LLaMA-Adapter V2 (Gao et al., 2023) on a frozen base.

**Adapter (v1).** Each block from ``adapter_start_layer`` on gains a learned prompt ``P`` [prompt_length, hidden].
Its keys and values come from the block's own (frozen) key/value projections, without rotary positions; every
query attends to them in a softmax of its own, and the result enters through a zero-initialised gate ``g``:

    out = attention(q, k, v) + g * softmax(q (W_k P)^T / sqrt(d)) (W_v P)

before the output projection, so step 0 is the base model exactly. ``g`` is one scalar per layer (as PEFT's
``adaption_prompt``, so it exports to PEFT) or one per head (``adapter_gate: per_head``, as LitGPT).

**Adapter v2** adds, on every linear layer of every block, a learned per-output-feature scale and bias,
``y = s * (W x + b + bias)`` (``s`` starts at one, ``bias`` at zero), trainable norms, and a scale (no bias: HF Llama's
head has none; LitGPT's has one) on an untied head. Scale, bias and norms fold into plain Llama weights
(``tools/merge_lora.py``); the prompt cannot.

Names: the prompt and gate are ``{i}.attention.adapter.prompt`` / ``.gate``; a linear layer's scale and bias are
``{path}.adapter.scale`` / ``.adapter.bias``. As with LoRA, the base's own names do not change. Tensor parallel: the
prompt is replicated (its gradient arrives summed through the key/value layers' input), a per-layer gate is
replicated with its gradient summed over the group (each rank holds only some heads), a per-head gate is split by
heads, a column layer's scale and bias are split by output rows and a row layer's are replicated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neox_llama.model.factory import full_shape, shard
from neox_llama.model.init import is_norm_tensor, seeded_generator
from neox_llama.peft.switch import adapters_enabled

METHODS = ("adapter", "adapter_v2")
"""The ``peft_method`` values this module implements (``lora`` is neox_llama/peft/lora.py)."""


@dataclass(frozen=True)
class AdapterSettings:
    """Everything that defines an adapter's shapes and its maths (saved with every adapter checkpoint)."""

    method: str
    prompt_length: int
    start_layer: int
    gate: str = "per_layer"

    @property
    def v2(self) -> bool:
        return self.method == "adapter_v2"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSettings:
        return cls(str(data["method"]), int(data["prompt_length"]), int(data["start_layer"]),
                   str(data.get("gate", "per_layer")))

    @classmethod
    def from_config(cls, cfg) -> AdapterSettings | None:
        if cfg.peft_method not in METHODS:
            return None
        return cls(cfg.peft_method, cfg.adapter_prompt_length, cfg.adapter_start_layer, cfg.adapter_gate)


class PrefixAdapter(nn.Module):
    """The learned prompt of one attention layer and its gate (``forward``: the gated prompt attention)."""

    def __init__(self, prompt: nn.Parameter, gate: nn.Parameter, factory, per_head: bool):
        super().__init__()
        self.prompt = prompt
        self.gate = gate
        self.per_head = per_head
        self.factory = factory

    def forward(self, q: torch.Tensor, key: nn.Module, value: nn.Module, kv_heads: int) -> torch.Tensor:
        """``q`` [batch, heads, seq, head_dim] (rotary applied) -> the gated attention over the prompt, same shape."""
        if not adapters_enabled():  # a preference run's reference: the base alone (peft/switch.py)
            return torch.zeros_like(q)
        batch, heads, _, head_dim = q.shape
        prompt = self.prompt[None].to(q.dtype)  # [1, prompt, hidden]; keys without rotary positions
        k = key(prompt).view(1, -1, kv_heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        v = value(prompt).view(1, -1, kv_heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads)  # every query sees the prompt
        gate = self.gate.view(1, heads, 1, 1) if self.per_head else self.factory.summed_over_group(self.gate)
        return gate.to(out.dtype) * out


class ScaleBias(nn.Module):
    """Adapter v2's per-output-feature scale (and bias) of one linear layer: ``y = scale * (W x + b + bias)``."""

    def __init__(self, scale: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.scale = scale
        self.bias = bias

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output * self.scale.to(output.dtype)


def _scale_and_shift(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    if not adapters_enabled():
        return output
    return module.adapter(output)


BLOCK_LINEARS = ("attention.query", "attention.key", "attention.value", "attention.dense", "mlp.gate", "mlp.up",
                 "mlp.down")
"""The linear layers of a block that Adapter v2 scales and shifts (those the block has)."""


def is_adapter_tensor(name: str, settings: AdapterSettings) -> bool:
    """Whether parameter ``name`` (within a layer) is trained, and saved, by an adapter run of ``settings``."""
    return ".adapter." in f".{name}" or (settings.v2 and is_norm_tensor(name))


@torch.no_grad()
def apply_adapter(layers: dict[int, nn.Module], settings: AdapterSettings, factory, args, seed: int) -> int:
    """Freeze every parameter of ``layers`` (global index -> module: 0 embedding, 1..N blocks, N+1 final norm,
    N+2 head), then attach the adapter of ``settings``; returns how many modules were attached.

    ``args`` (LlamaArgs) gives the shapes and the prompt's initial scale (``init_method_std``); the prompt is drawn
    per (seed, layer), whatever the layout.
    """
    for layer in layers.values():
        for param in layer.parameters():
            param.requires_grad_(False)
    attached = 0
    num_layers = args.num_layers
    for index, layer in layers.items():
        block = index - 1 if 1 <= index <= num_layers else None
        modules = dict(layer.named_modules())
        if block is not None and block >= settings.start_layer:
            attention = modules["attention"]
            device, dtype = attention.query.weight.device, attention.query.weight.dtype
            prompt = factory.parameter((settings.prompt_length, args.hidden_size), None, device, dtype)
            draw = seeded_generator("adapter", seed, index, "prompt")
            full = torch.empty(prompt.shape).normal_(0.0, args.init_method_std, generator=draw)
            prompt.copy_(full.to(dtype))
            per_head = settings.gate == "per_head"
            gate = factory.parameter((args.num_attention_heads,) if per_head else (1,), 0 if per_head else None,
                                     device, dtype)
            gate.zero_()
            attention.add_module("adapter", PrefixAdapter(prompt, gate, factory, per_head))
            attached += 1
        if not settings.v2:
            continue
        paths = BLOCK_LINEARS if block is not None else (("head",) if index == num_layers + 2 else ())
        for path in paths:
            linear = modules.get(path)
            if linear is None or not hasattr(linear, "weight") or hasattr(linear, "adapter"):
                continue  # e.g. mlp.gate of a gelu MLP; the tied head (the embedding's method) has no layer here
            device, dtype = linear.weight.device, linear.weight.dtype
            split = 0 if factory.splits_output(linear) else None
            out_features = full_shape(linear.weight)[0]  # (a ZeRO-3 partition's own shape is empty)
            scale = factory.parameter((out_features,), split, device, dtype)
            scale.copy_(shard(torch.ones(out_features), scale).to(dtype))
            bias = None
            if path != "head":
                bias = factory.parameter((out_features,), split, device, dtype)
                bias.zero_()
            linear.add_module("adapter", ScaleBias(scale, bias))
            linear.register_forward_hook(_scale_and_shift)
            attached += 1
        for name, param in layer.named_parameters():
            if is_norm_tensor(name):
                param.requires_grad_(True)
    return attached


@torch.no_grad()
def folded_layer(tensors: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's base ``tensors`` with Adapter v2's ``trained`` tensors folded in, in float32 and returned in the
    base's dtype: ``W' = diag(s) W`` and ``b' = s * (b + bias)`` for each scaled linear layer, the trained norm
    tensors in place of the base's. The prompt and gate (``attention.adapter.*``) are left out: they cannot be
    folded. A shifted linear layer without a bias gains one."""
    out = dict(tensors)
    for name, value in trained.items():
        if name.startswith("attention.adapter."):
            continue
        if is_norm_tensor(name):
            out[name] = value.to(tensors[name].dtype if name in tensors else value.dtype)
            continue
        path, kind = name.rsplit(".adapter.", 1)
        weight = tensors[f"{path}.weight"]
        scale = trained[f"{path}.adapter.scale"].float()
        if kind == "scale":
            out[f"{path}.weight"] = (scale[:, None] * weight.float()).to(weight.dtype)
            if f"{path}.bias" in tensors and f"{path}.adapter.bias" not in trained:
                out[f"{path}.bias"] = (scale * tensors[f"{path}.bias"].float()).to(weight.dtype)
        else:
            bias = tensors.get(f"{path}.bias")
            base_bias = bias.float() if bias is not None else torch.zeros_like(value, dtype=torch.float32)
            out[f"{path}.bias"] = (scale * (base_bias + value.float())).to(weight.dtype)
    return out
