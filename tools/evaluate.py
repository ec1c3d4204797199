#!/usr/bin/env python
"""Evaluate a checkpoint: loss, perplexity and bits per byte (see neox_llama/cli/evaluate.py).

    python tools/evaluate.py --checkpoint runs/local/checkpoints
"""

import sys

from neox_llama.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
