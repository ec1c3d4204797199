"""Where the layer list meets DeepSpeed: a PipelineModule when pipe_parallel_size > 1, else a plain module.

Both are built from the same :func:`neox_llama.model.specs.layer_specs` list and initialised the same
way (per global layer index), so the same seed gives the same weights at any layout.
"""

from __future__ import annotations

from torch import nn

from neox_llama.model.args import LlamaArgs
from neox_llama.model.factory import SINGLE_DEVICE, LayerFactory
from neox_llama.model.init import init_weights
from neox_llama.model.layers import tied_head_forward
from neox_llama.model.llama import build_model
from neox_llama.model.loss import CausalLMLoss
from neox_llama.model.specs import layer_specs
from neox_llama.parallel.tensor_parallel import TensorParallelFactory
from neox_llama.parallel.topology import ParallelState

TIED_WEIGHT = "word_embeddings.weight"


def layer_factory(state: ParallelState) -> LayerFactory:
    """Single-device layers, or layers sharded over this rank's tensor-parallel group."""
    return TensorParallelFactory(state.tp_group) if state.tp_size > 1 else SINGLE_DEVICE


def build_pipeline_module(args: LlamaArgs, state: ParallelState, *, partition_method: str = "type:TransformerBlock",
                          checkpoint_every: int = 0) -> nn.Module:
    """This rank's stage of a ``deepspeed.pipe.PipelineModule`` with the loss attached."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    factory = layer_factory(state)
    ds_specs = []
    for spec in layer_specs(args, factory):
        if spec.tie_key:
            forward_fn = tied_head_forward if spec.forward_name == "as_head" else None
            ds_specs.append(TiedLayerSpec(spec.tie_key, spec.cls, forward_fn=forward_fn, tied_weight_attr=[TIED_WEIGHT],
                                          **spec.kwargs))
        else:
            ds_specs.append(LayerSpec(spec.cls, **spec.kwargs))
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
