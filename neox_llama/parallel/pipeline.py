"""Where the layer list meets DeepSpeed: a PipelineModule when pipe_parallel_size > 1, else a plain module.

Both hold the same layer classes of neox_llama/model/llama.py in the same order (0 embedding, 1..N blocks, N+1 final
norm, N+2 head) and are initialised the same way (per global layer index), so the same seed gives the same weights
at any layout.
"""

from __future__ import annotations

import torch
from torch import nn

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import SINGLE_DEVICE, LayerFactory
from neox_llama.model.init import init_weights
from neox_llama.model.llama import EmbeddingLayer, FinalNorm, HeadLayer, TransformerBlock, build_model
from neox_llama.model.loss import CausalLMLoss
from neox_llama.parallel.tensor_parallel import TensorParallelFactory
from neox_llama.parallel.topology import ParallelState

TIED_WEIGHT = "word_embeddings.weight"
TIE_KEY = "embed"


def tied_head_forward(embedding: EmbeddingLayer, hidden: torch.Tensor) -> torch.Tensor:
    """Forward of the tied head copy in a pipeline (DeepSpeed TiedLayerSpec.forward_fn)."""
    return embedding.as_head(hidden)


def layer_factory(state: ParallelState) -> LayerFactory:
    """Single-device layers, or layers sharded over this rank's tensor-parallel group."""
    return TensorParallelFactory(state.tp_group) if state.tp_size > 1 else SINGLE_DEVICE


def build_pipeline_module(args: LlamaArgs, state: ParallelState, *, partition_method: str = "type:TransformerBlock",
                          checkpoint_every: int = 0) -> nn.Module:
    """This rank's stage of a ``deepspeed.pipe.PipelineModule`` with the loss attached."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    factory = layer_factory(state)
    common = {"args": args, "factory": factory}
    if args.tie_embeddings:
        tied = {"tied_weight_attr": [TIED_WEIGHT], **common}
        embedding = TiedLayerSpec(TIE_KEY, EmbeddingLayer, **tied)
        head = TiedLayerSpec(TIE_KEY, EmbeddingLayer, forward_fn=tied_head_forward, **tied)
    else:
        embedding, head = LayerSpec(EmbeddingLayer, **common), LayerSpec(HeadLayer, **common)
    ds_specs = [embedding, *(LayerSpec(TransformerBlock, **common) for _ in range(args.num_layers)),
                LayerSpec(FinalNorm, **common), head]
    # Non-reentrant recomputation: a block whose input needs no gradient (a frozen embedding before it) still
    # gives its trainable parameters theirs (the reentrant kind fails there, DeepSpeed #3339). A frozen tied
    # embedding has no gradient to reduce: DeepSpeed 0.19.8's engine skips it (_exec_reduce_tied_grads; its
    # unguarded PipelineModule.allreduce_tied_weight_gradients is never called), tested with pp 2 + LoRA.
    module = PipelineModule(
        layers=ds_specs, loss_fn=CausalLMLoss(factory), topology=state.topology,
        partition_method=partition_method, activation_checkpoint_interval=checkpoint_every,
        activation_checkpoint_func=non_reentrant_checkpoint, checkpointable_layers=["TransformerBlock"],
    )
    for index, layer in stage_layers(module).items():
        init_weights(layer, index, args)
    return module


def stage_layers(module: nn.Module) -> dict[int, nn.Module]:
    """Global layer index -> module, for the layers this pipeline stage owns (tied ones included)."""
    layers: dict[int, nn.Module] = {}
    for local, func in enumerate(module.forward_funcs):
        index = module._local_start + local
        if isinstance(func, nn.Module):
            layers[index] = func
    for tied in module.tied_modules.values():
        layers.setdefault(0, tied)  # the embedding owns the tied weight; its global index is 0
    return layers


def build_module(args: LlamaArgs, state: ParallelState, *, checkpoint_every: int = 0,
                 partition_method: str = "type:TransformerBlock", initialize: bool = True) -> nn.Module:
    """The runnable model for this rank: a PipelineModule stage (pp > 1) or the whole (tensor-parallel) model;
    ``initialize`` False leaves the weights to the caller (ZeRO-3 builds under ``deepspeed.zero.Init``)."""
    if state.pp_size > 1:
        return build_pipeline_module(args, state, partition_method=partition_method, checkpoint_every=checkpoint_every)
    return build_model(args, layer_factory(state), checkpoint_every=checkpoint_every, initialize=initialize)


def rank_layers(module: nn.Module, state: ParallelState) -> dict[int, nn.Module]:
    """Global layer index -> module for every layer this rank holds (pipeline stage or whole model)."""
    if state.pp_size > 1:
        return stage_layers(module)
    return {int(index): layer for index, layer in module.named_children()}
