#!/usr/bin/env python
"""Draw training and validation loss, learning rate and tokens/s from a metrics.jsonl file to a PNG.

    python tools/plot_metrics.py runs/local/logs/metrics.jsonl [--output runs/local/logs/metrics.png]
"""

import sys

from neox_llama.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
