#!/usr/bin/env python
"""Per-rank entry point, started by deepy.py on every rank:  python deepy.py train.py CONFIG.yml ...

Pretrains, resumes or fine-tunes as the merged config says (see neox_llama/training/trainer.py).
"""

import sys

from neox_llama.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
