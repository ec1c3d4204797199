"""The on-disk checkpoint format, with no DeepSpeed: paths, metadata, layout-free weights, loading a run or a model.

A checkpoint folder ``{save}/global_step{N}/`` (or ``best/``) holds

- ``metadata.json``: :class:`~neox_llama.checkpoint.metadata.Metadata` (step, data position, layout), written last;
- ``config.yml``: the merged config of the run, and the tokenizer file(s) it names;
- ``weights/layer_XXX.safetensors``: every layer's full (un-sharded) tensors under stable names, the fp32 masters
  the optimizer steps, so that any layout, fine-tuning, generation and export can read them (an adapter run:
  ``adapter/`` with its trained tensors);
- ``optimizer/layer_XXX.safetensors`` and ``optimizer/state.json``: each trained tensor's optimizer state (Adam's
  moments) and the step, layout-free (read and written by :mod:`neox_llama.training.optimizer_state`);
- ``rng/rank_R.pt`` (restored at the same world size); DeepSpeed's own engine files only for fp16 at ZeRO stage 0
  and in checkpoints written before 2026-12-07 (same layout only).

``{save}/latest`` names the newest complete checkpoint and is written atomically after it.
"""
