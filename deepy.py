#!/usr/bin/env python
"""Launch a neox_llama script on every rank (the logic and its full help: neox_llama/cli/deepy.py).

    python deepy.py train.py CONFIG.yml [CONFIG.yml ...] [key=value ...] [--dry-run] [--force]
"""

import sys

from neox_llama.cli.deepy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
