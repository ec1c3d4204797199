#!/usr/bin/env python
"""Tokenize a corpus into memory-mapped MMIDIDX datasets ({output_prefix}_{key}_document.{bin,idx}).

    python tools/preprocess_data.py --input data/a.jsonl,data/b.jsonl.gz --output-prefix data/corpus \
        --tokenizer-type SPMTokenizer --vocab-file tokenizer.model --append-eod --workers 2
"""

import sys

from neox_llama.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
