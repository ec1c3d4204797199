"""The feed-forward network: SwiGLU (Llama) or GeLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import LayerFactory


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; GeLU: ``down(gelu(up(x)))``.

    ``intermediate_size`` is the width of ``gate``/``up`` exactly as in Hugging Face (no 2/3 rule).
    """

    def __init__(self, args: LlamaArgs, factory: LayerFactory):
        super().__init__()
        bias = args.use_bias_in_mlp
        self.swiglu = args.activation == "swiglu"
        if self.swiglu:
            self.gate = factory.column(args.hidden_size, args.intermediate_size, bias)
        self.up = factory.column(args.hidden_size, args.intermediate_size, bias)
        self.down = factory.row(args.intermediate_size, args.hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))
