"""Many adapters of one base in one batch: each row of a forward pass applies its own adapter's update.

The base weights are loaded once and never changed. For every linear layer any adapter targets, the bank stacks
the adapters' ``A`` [r, in] and ``scale x B`` [out, r] (ranks zero-padded to the largest; index 0 is the base:
all zeros; an adapter that does not target the layer is zeros too) and a forward hook adds, for row ``i``,
``B[k_i] (A[k_i] x_i)`` where ``k_i`` is the row's adapter (:meth:`AdapterBank.select`), with two batched
matrix products. This is how the server decodes requests for different fine-tunes together (as S-LoRA/Punica do,
without their custom kernels); a single adapter gives what generation with it merged gives, up to float rounding.
Adapter and Adapter v2 checkpoints join the same bank through neox_llama/generation/adapter_rows.py.
"""

from __future__ import annotations

import torch
from torch import nn

from neox_llama.checkpoint.adapter import adapter_layers, updates_by_weight
from neox_llama.checkpoint.merge import Adapter, find_base
from neox_llama.checkpoint.paths import CheckpointError
from neox_llama.generation.adapter_rows import attach_adapter_rows


class _Stack(nn.Module):
    """The stacked updates of one linear layer: ``a`` [adapters + 1, r, in], ``b`` [adapters + 1, out, r]."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bank: AdapterBank):
        super().__init__()
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.bank = [bank]  # a list, so the bank is not registered as a submodule

    def update(self, x: torch.Tensor) -> torch.Tensor | None:
        rows = self.bank[0].rows
        if rows is None or not bool(rows.any()):
            return None
        a, b = self.a[rows], self.b[rows]  # [batch, r, in], [batch, out, r]
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


def _add_row_updates(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    update = module.lora_bank.update(inputs[0])
    return output if update is None else output + update.to(output.dtype)


class AdapterBank:
    """LoRA adapters (``names[k - 1]`` is adapter ``k``) attached to a :class:`LanguageModel`'s base model."""

    def __init__(self, names: list[str], adapters: list[Adapter]):
        self.names, self.adapters = names, adapters
        self.rows: torch.Tensor | None = None

    def select(self, rows: torch.Tensor | None) -> None:
        """The adapter index of every row of the next forward pass (None: the base model for all)."""
        self.rows = rows

    def prompt_style(self, index: int) -> str | None:
        return self.adapters[index - 1].metadata.prompt_style if index else None

    @classmethod
    @torch.no_grad()
    def attach(cls, lm, adapters: dict[str, str]) -> AdapterBank:
        """Open every adapter checkpoint of ``adapters`` (name -> folder; LoRA, Adapter, Adapter v2), check it was trained on ``lm``'s checkpoint
        (fingerprint and shapes), and hook the stacked updates into ``lm``'s model; sets ``lm.bank``."""
        if lm.run.adapters:
            raise CheckpointError(f"{lm.run.folder}: adapters are served on a full checkpoint, not on an adapter one")
        opened = [Adapter.open(folder) for folder in adapters.values()]
        for adapter in opened:
            find_base([adapter], lm.run.folder)
        bank = cls(list(adapters), opened)
        updates: dict[tuple[int, str], dict[int, tuple]] = {}
        others = [(k, a, adapter_layers(a.folder)) for k, a in enumerate(opened, start=1) if not a.is_lora]
        if others:  # Adapter / Adapter v2: per-row prompts, gates, scales, biases and norms
            try:
                attach_adapter_rows(lm.model, bank, others, len(opened))
            except KeyError as err:
                raise CheckpointError(f"{others[0][1].folder} (or another Adapter of the bank): adapter tensor {err} is "
                                      "missing beside its companions; the checkpoint is incomplete") from None
        for k, adapter in enumerate(opened, start=1):
            if not adapter.is_lora:
                continue
            for index, tensors in adapter_layers(adapter.folder).items():
                for name, (a, b, scale) in updates_by_weight(tensors, adapter.settings.scaling).items():
                    updates.setdefault((index, name.removesuffix(".weight")), {})[k] = (a, b.float() * scale, adapter)
        layers = dict(lm.model.named_children())
        for (index, path), per_adapter in updates.items():
            modules = dict(layers[str(index)].named_modules()) if str(index) in layers else {}
            linear = modules.get(path)
            if not isinstance(getattr(linear, "weight", None), torch.Tensor):
                adapter = next(iter(per_adapter.values()))[2]
                raise CheckpointError(f"{adapter.folder}: an update for {path} of layer {index}, which the base "
                                      "does not have; the adapter was trained on another model")
            out_features, in_features = linear.weight.shape
            rank = max(a.shape[0] for a, _, _ in per_adapter.values())
            dtype, device = linear.weight.dtype, linear.weight.device
            a_stack = torch.zeros(len(opened) + 1, rank, in_features, dtype=dtype, device=device)
            b_stack = torch.zeros(len(opened) + 1, out_features, rank, dtype=dtype, device=device)
            for k, (a, b, adapter) in per_adapter.items():
                if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
                    raise CheckpointError(f"{adapter.folder}: {path} of layer {index} is {out_features}x{in_features} in "
                                          f"the base, the update {tuple(b.shape)} x {tuple(a.shape)}; "
                                          "the adapter was trained on another model")
                a_stack[k, : a.shape[0]] = a.to(dtype)
                b_stack[k, :, : b.shape[1]] = b.to(dtype)
            linear.add_module("lora_bank", _Stack(a_stack, b_stack, bank))
            linear.register_forward_hook(_add_row_updates)
        lm.bank = bank
        return bank
