"""neox_llama: GPT-NeoX-style, YAML-configured pretraining and fine-tuning of Llama-2/3 models on DeepSpeed."""

__version__ = "0.1.0"
