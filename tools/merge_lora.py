#!/usr/bin/env python
"""Merge LoRA checkpoints into their base (see neox_llama/cli/merge_lora.py).

    python tools/merge_lora.py --checkpoint runs/lora/global_step600 --output runs/merged
"""

import sys

from neox_llama.cli.merge_lora import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
