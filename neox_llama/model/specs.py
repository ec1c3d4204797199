"""Config -> the ordered list of layers, as plain classes and arguments.

Global layer indices (stable; checkpoints and converters rely on them):
``0`` embedding, ``1..N`` transformer blocks, ``N+1`` final norm, ``N+2`` head.
Parameter names are ``{index}.{name}`` with names such as ``0.word_embeddings.weight``,
``3.attention.query.weight``, ``3.mlp.down.weight``, ``{N+1}.norm.weight``, ``{N+2}.head.weight``.
With tied embeddings the head (index N+2) owns no parameter: it reuses ``0.word_embeddings.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import SINGLE_DEVICE, LayerFactory
from neox_llama.model.layers import EmbeddingLayer, FinalNorm, HeadLayer, TransformerBlock

TIE_KEY = "embed"


@dataclass
class LayerSpec:
    """One layer to build: ``cls(**kwargs)``. Layers sharing a ``tie_key`` share weights; the second
    occurrence runs ``forward_name`` of the first instead of its forward."""

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    tie_key: str | None = None
    forward_name: str | None = None

    def build(self):
        return self.cls(**self.kwargs)


def layer_specs(args: LlamaArgs, factory: LayerFactory = SINGLE_DEVICE) -> list[LayerSpec]:
    """The model as a list: embedding, blocks, final norm, head."""
    common = {"args": args, "factory": factory}
    tie = TIE_KEY if args.tie_embeddings else None
    specs = [LayerSpec(EmbeddingLayer, common, tie_key=tie)]
    specs += [LayerSpec(TransformerBlock, common) for _ in range(args.num_layers)]
    specs.append(LayerSpec(FinalNorm, common))
    if tie:
        specs.append(LayerSpec(EmbeddingLayer, common, tie_key=tie, forward_name="as_head"))
    else:
        specs.append(LayerSpec(HeadLayer, common))
    return specs


def is_output_projection(name: str) -> bool:
    """Matrices whose initialisation is scaled down by depth (they add into the residual stream)."""
    return name.endswith(("attention.dense.weight", "mlp.down.weight"))
