#!/usr/bin/env python
"""Export a neox_llama checkpoint to a Hugging Face Llama directory (loads with transformers, offline).

    python tools/convert_to_hf.py --checkpoint runs/local/checkpoints --output runs/local/hf [--dtype bf16|fp16|fp32] [--force]

--checkpoint is a save directory (its `latest` checkpoint is used) or one global_stepN folder.
"""

import sys

from neox_llama.cli.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
