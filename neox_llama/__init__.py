"""neox_llama: GPT-NeoX-style, YAML-configured pretraining and fine-tuning of Llama-2/3 models on DeepSpeed.

Importing the package has no side effects and imports nothing heavy; see docs/architecture.md for the layout.
"""

__version__ = "0.1.0"
