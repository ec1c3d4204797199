"""Fine-tuning only part of a model: methods that decorate a built model from outside, never editing its code.

``lora`` (LoRA), ``adapter`` (LLaMA-Adapter and Adapter v2) attach trainable modules to a model's layers by forward
hooks, so the base's parameter names never change; ``methods`` is the one place that dispatches between them
(settings from a config or a checkpoint, attach, which tensors train and are saved); ``freeze`` turns ``freeze``
patterns off. They ask the model's layer factory (neox_llama/model/factory.py) for sharded parameters and
collectives, so the same code serves one device and tensor parallelism. No DeepSpeed here.
"""
