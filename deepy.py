#!/usr/bin/env python
"""Launch a neox_llama script on every rank.

    python deepy.py train.py CONFIG.yml [CONFIG.yml ...] [key=value ...] [--dry-run] [--force]

Config files merge left to right, then ``key=value`` overrides (dotted for nested keys, e.g.
``optimizer.params.lr=1e-4``). The merged config is validated for the world it will run in before
any process starts; it is then written to ``{log_dir}/config.yml`` and every rank reads that file.
One rank runs the script directly; more go through DeepSpeed's launcher.

Before that, the datasets, a resume target's shapes and (without GPUs) the host memory are checked
(neox_llama/preflight.py); ``--force`` starts even when the memory estimate exceeds this machine's RAM.
``--dry-run`` prints the plan and turns every refusal into a warning.
"""

import sys

from neox_llama.cli.deepy import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
