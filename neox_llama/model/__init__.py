"""A single-device Llama that reads like the paper; parallel wrappers (neox_llama.parallel) decorate it.

No DeepSpeed here: the model is an ordered list of plain layers (see :mod:`neox_llama.model.specs`).
"""
