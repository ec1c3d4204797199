"""The pipeline-ready pieces of a Llama: embedding, transformer block, final norm, output head.

Between layers flows ``(hidden, position_ids)``; the final norm drops the positions and the head
returns logits. Each layer is a plain ``nn.Module`` so the same list runs on one device, as a
DeepSpeed pipeline, or tensor-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_llama.model.args import LlamaArgs
from neox_llama.model.attention import Attention
from neox_llama.model.factory import LayerFactory
from neox_llama.model.kv_cache import KVCache
from neox_llama.model.mlp import MLP
from neox_llama.model.norms import make_norm

Activation = tuple[torch.Tensor, torch.Tensor]


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
        if isinstance(inputs, (tuple, list)):
            input_ids, position_ids = inputs[0], inputs[1]
        else:
            input_ids, position_ids = inputs, None
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


def tied_head_forward(embedding: EmbeddingLayer, hidden: torch.Tensor) -> torch.Tensor:
    """Forward of the tied head copy in a pipeline (DeepSpeed TiedLayerSpec.forward_fn)."""
    return embedding.as_head(hidden)
