"""A single-device Llama that reads like the paper, in one file (:mod:`neox_llama.model.llama`); parallel layers
(neox_llama.parallel) and fine-tuning methods (neox_llama.peft: LoRA, Adapter, freezing) decorate it from outside.

No DeepSpeed here. Beside the model: its arguments (``args``), where its layers come from and how a parameter records
its shard (``factory``), layout-free initialisation (``init``) and the loss (``loss``, ``cross_entropy``).
"""
