#!/usr/bin/env python
"""Translate GPT-NeoX config files into one neox_llama config, with a report of every key.

    python tools/convert_neox_config.py NEOX.yml [NEOX2.yml ...] --output OURS.yml [--vocab-size N] [--drop-unsupported]
"""

import sys

from neox_llama.cli.convert_neox_config import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
