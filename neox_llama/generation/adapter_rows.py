"""Adapter and Adapter v2 checkpoints in the adapter bank: each row of a batch gets its own adapter's prompt and
gate, linear scales and biases, and norms (the base, row index 0, gets none: closed gates, unit scales, zero
biases, the base's norms). Used by :class:`neox_llama.generation.adapter_bank.AdapterBank` next to its LoRA stacks,
so the server decodes requests for LoRA, Adapter and Adapter v2 fine-tunes of one base together.

Prompts of different lengths are padded and the padding masked out; a row whose adapter has no prompt in a layer
attends to zeros through a closed gate. The maths per row is peft/adapter.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.model.llama import RMSNorm
from neox_llama.peft.adapter import is_norm_tensor


class _Rows(nn.Module):
    """Stacked per-adapter tensors of one module (index 0: the base), read by the bank's current rows."""

    def __init__(self, bank, **stacks: torch.Tensor):
        super().__init__()
        for name, stack in stacks.items():
            self.register_buffer(name, stack, persistent=False)
        self.bank = [bank]  # a list, so the bank is not registered as a submodule

    @property
    def rows(self) -> torch.Tensor | None:
        return self.bank[0].rows


class RowPrefix(_Rows):
    """``attention.adapter`` of a bank: each row's gated attention over its own adapter's prompt."""

    def forward(self, q: torch.Tensor, key: nn.Module, value: nn.Module, kv_heads: int) -> torch.Tensor:
        rows = self.rows
        if rows is None:
            return q.new_zeros(())
        batch, heads, _, head_dim = q.shape
        prompts = self.prompts[rows].to(q.dtype)  # [batch, length, hidden]
        length = prompts.shape[1]
        k = key(prompts).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = value(prompts).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        lengths = self.lengths[rows]
        # a row without a prompt here attends to all (zero) positions, so softmax stays finite; its gate is closed
        mask = (torch.arange(length, device=q.device)[None] < lengths[:, None]) | (lengths == 0)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=kv_heads != heads)
        return self.gates[rows].view(batch, heads, 1, 1).to(out.dtype) * out


def _row_scale_bias(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    rows = module.adapter_rows.rows
    if rows is None:
        return output
    shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)
    bias = module.adapter_rows.bias[rows].view(shape).to(output.dtype)
    return (output + bias) * module.adapter_rows.scale[rows].view(shape).to(output.dtype)


def _row_norm(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    rows = module.norm_rows.rows
    if rows is None:
        return output
    x = inputs[0]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    weight = module.norm_rows.weight[rows].view(shape)
    if isinstance(module, RMSNorm):
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=module.eps).to(x.dtype)
    normed = F.layer_norm(x, (x.shape[-1],), eps=module.eps)
    return normed * weight + module.norm_rows.bias[rows].view(shape)


def _find(layer: nn.Module, path: str, adapter, index: int) -> nn.Module:
    module = dict(layer.named_modules()).get(path)
    if module is None:
        raise CheckpointError(f"{adapter.folder}: tensors for {path} of layer {index}, which the base does not have; "
                              "the adapter was trained on another model")
    return module


def _check(shape, expected, entries, k: int, what: str) -> None:
    allowed = expected if isinstance(expected[0], tuple) else (expected,)
    if tuple(shape) not in allowed:
        adapter = next(a for i, a, _ in entries if i == k)
        raise CheckpointError(f"{adapter.folder}: {what} has shape {tuple(shape)}, the base expects "
                              f"{' or '.join(str(a) for a in allowed)}; the adapter was trained on another model")


@torch.no_grad()
def attach_adapter_rows(model: nn.Module, bank, entries: list[tuple[int, object, dict[int, dict]]], count: int) -> None:
    """Hook the Adapter / Adapter v2 checkpoints of ``entries`` ((bank index, Adapter, its tensors by layer)) into
    ``model``; ``count`` is the number of adapters in the bank (stacks have ``count + 1`` rows)."""
    layers = {int(i): m for i, m in model.named_children()}
    prompts: dict[int, dict[int, tuple]] = {}
    linears: dict[tuple[int, str], dict[int, dict]] = {}
    norms: dict[tuple[int, str], dict[int, dict]] = {}
    for k, adapter, per_layer in entries:
        for index, tensors in per_layer.items():
            if index not in layers:
                raise CheckpointError(f"{adapter.folder}: adapter tensors for layer {index}, which the base does not "
                                      "have; the adapter was trained on another model")
            for name, tensor in tensors.items():
                if name.startswith("attention.adapter."):
                    prompts.setdefault(index, {}).setdefault(k, {})[name.rsplit(".", 1)[1]] = tensor
                elif is_norm_tensor(name):
                    path, what = name.rsplit(".", 1)
                    norms.setdefault((index, path), {}).setdefault(k, {})[what] = tensor
                else:
                    path, what = name.split(".adapter.")
                    linears.setdefault((index, path), {}).setdefault(k, {})[what] = tensor
    for index, per_adapter in prompts.items():
        attention = _find(layers[index], "attention", entries[0][1], index)
        hidden = attention.query.weight.shape[1]
        heads = attention.local_heads
        length = max(t["prompt"].shape[0] for t in per_adapter.values())
        dtype, device = attention.query.weight.dtype, attention.query.weight.device
        stack = torch.zeros(count + 1, length, hidden, dtype=dtype, device=device)
        lengths = torch.zeros(count + 1, dtype=torch.long, device=device)
        gates = torch.zeros(count + 1, heads, dtype=dtype, device=device)
        for k, tensors in per_adapter.items():
            _check(tensors["prompt"].shape[1:], (hidden,), entries, k, f"the prompt of layer {index}")
            _check(tensors["gate"].shape, ((1,), (heads,)), entries, k, f"the gate of layer {index}")
            stack[k, : tensors["prompt"].shape[0]] = tensors["prompt"].to(dtype)
            lengths[k] = tensors["prompt"].shape[0]
            gates[k] = tensors["gate"].to(dtype).expand(heads)
        attention.add_module("adapter", RowPrefix(bank, prompts=stack, lengths=lengths, gates=gates))
    for (index, path), per_adapter in linears.items():
        linear = _find(layers[index], path, entries[0][1], index)
        out_features = linear.weight.shape[0]
        dtype, device = linear.weight.dtype, linear.weight.device
        scale = torch.ones(count + 1, out_features, dtype=dtype, device=device)
        bias = torch.zeros(count + 1, out_features, dtype=dtype, device=device)
        for k, tensors in per_adapter.items():
            for tensor in tensors.values():
                _check(tensor.shape, (out_features,), entries, k, f"{path} of layer {index}")
            scale[k] = tensors["scale"].to(dtype)
            if "bias" in tensors:
                bias[k] = tensors["bias"].to(dtype)
        linear.add_module("adapter_rows", _Rows(bank, scale=scale, bias=bias))
        linear.register_forward_hook(_row_scale_bias)
    for (index, path), per_adapter in norms.items():
        norm = _find(layers[index], path, entries[0][1], index)
        weight = norm.weight.detach().expand(count + 1, -1).clone()
        bias = norm.bias.detach().expand(count + 1, -1).clone() if getattr(norm, "bias", None) is not None else None
        for k, tensors in per_adapter.items():
            for tensor in tensors.values():
                _check(tensor.shape, tuple(norm.weight.shape), entries, k, f"{path} of layer {index}")
            weight[k] = tensors["weight"].to(weight.dtype)
            if bias is not None and "bias" in tensors:
                bias[k] = tensors["bias"].to(bias.dtype)
        stacks = {"weight": weight} | ({"bias": bias} if bias is not None else {})
        norm.add_module("norm_rows", _Rows(bank, **stacks))
        norm.register_forward_hook(_row_norm)
