"""The on-disk checkpoint format, with no DeepSpeed: paths, metadata, layout-free weights, loading a run or a model.

A checkpoint folder ``{save}/global_step{N}/`` (or ``best/``) holds

- ``metadata.json``: :class:`~neox_llama.checkpoint.metadata.Metadata` (step, data position, layout), written last;
- ``config.yml``: the merged config of the run, and the tokenizer file(s) it names;
- ``weights/layer_XXX.safetensors``: every layer's full (un-sharded) tensors under stable names, so that any
  layout, fine-tuning, generation and export can read them;
- DeepSpeed's own engine state and ``rng/rank_R.pt`` (read only by :mod:`neox_llama.training`, same layout).

``{save}/latest`` names the newest complete checkpoint and is written atomically after it.
"""
