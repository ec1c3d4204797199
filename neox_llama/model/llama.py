"""The model on one device (or tensor-parallel, through its factory): the layer list run in order."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import SINGLE_DEVICE, LayerFactory
from neox_llama.model.init import init_weights
from neox_llama.model.layers import TransformerBlock
from neox_llama.model.specs import LayerSpec, layer_specs


class _TiedForward(nn.Module):
    """Runs another layer's method (the tied head) without owning, or naming, its parameters."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered (and named) twice
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._owner[0], self.method)(x)


class LlamaStack(nn.Module):
    """Layers registered under their global index (``0.word_embeddings.weight`` ...), run in order.

    ``checkpoint_every`` > 0 recomputes each group of that many transformer blocks in backward.
    """

    def __init__(self, specs: list[LayerSpec], checkpoint_every: int = 0):
        super().__init__()
        owners: dict[str, nn.Module] = {}
        for index, spec in enumerate(specs):
            if spec.tie_key and spec.tie_key in owners:
                layer = _TiedForward(owners[spec.tie_key], spec.forward_name or "forward")
            else:
                layer = spec.build()
                if spec.tie_key:
                    owners[spec.tie_key] = layer
            self.add_module(str(index), layer)
        self.checkpoint_every = checkpoint_every

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = (input_ids, position_ids)
        layers = list(self.children())
        i = 0
        while i < len(layers):
            if self.checkpoint_every and self.training and isinstance(layers[i], TransformerBlock):
                group = []
                while i < len(layers) and isinstance(layers[i], TransformerBlock) and len(group) < self.checkpoint_every:
                    group.append(layers[i])
                    i += 1
                x = checkpoint(_run_group, group, *x, use_reentrant=False)
                continue
            x = layers[i](x)
            i += 1
        return x


def _run_group(group: list[nn.Module], hidden: torch.Tensor, position_ids: torch.Tensor):
    x = (hidden, position_ids)
    for layer in group:
        x = layer(x)
    return x


def build_model(args: LlamaArgs, factory: LayerFactory = SINGLE_DEVICE, *, checkpoint_every: int = 0,
                device: torch.device | str | None = None, initialize: bool = True) -> LlamaStack:
    """The whole model on this rank, initialised from ``args.seed`` independently of the layout.

    ``device="meta"`` builds it without memory (for counting); it is then not initialised.
    """
    with torch.device(device or "cpu"):
        model = LlamaStack(layer_specs(args, factory), checkpoint_every)
    if initialize and str(device) != "meta":
        for index, layer in model.named_children():
            init_weights(layer, int(index), args)
    return model
