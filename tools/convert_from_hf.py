#!/usr/bin/env python
"""Convert a local Hugging Face Llama directory into a neox_llama checkpoint for fine-tuning.

    python tools/convert_from_hf.py --hf path/to/Llama-3.2-1B --output checkpoints/llama32-1b \
        [--pipe-parallel-size N] [--model-parallel-size M] [--force]

Then: python deepy.py train.py checkpoints/llama32-1b/model.yml configs/local.yml
"""

import sys

from neox_llama.cli.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
