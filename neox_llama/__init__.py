"""neox_llama: GPT-NeoX-style, YAML-configured pretraining and fine-tuning of Llama-2/3 models on DeepSpeed."""

__version__ = "0.1.0"


def _default_deepspeed_accelerator() -> None:
    # DeepSpeed probes for accelerators (and warns) on import; without CUDA, say CPU up front.
    import os

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


_default_deepspeed_accelerator()
