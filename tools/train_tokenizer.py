#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer with Llama-2's settings on text files.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --output-prefix data/tokenizer/shakespeare_bpe --vocab-size 2048
"""

import sys

from neox_llama.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
