#!/usr/bin/env python
"""Serve a checkpoint (and LoRA adapters of it) over an OpenAI-compatible HTTP API.

    python tools/serve.py --checkpoint runs/local/checkpoints --port 8000
    python tools/serve.py --checkpoint BASE --adapter alpaca=runs/lora/checkpoints
"""

import sys

from neox_llama.cli.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
