#!/usr/bin/env python
"""Generate text from a neox_llama checkpoint (KV cache; greedy or sampled; streaming; chat).

    python tools/generate.py --checkpoint runs/local/checkpoints --prompt "ROMEO:" --max-new-tokens 64
    python tools/generate.py --checkpoint DIR --prompts-file prompts.txt --temperature 0.8 --top-p 0.9
    python tools/generate.py --checkpoint DIR --chat [--system "You are terse."]
"""

import sys

from neox_llama.cli.generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
