"""A random checkpoint with its own sentencepiece tokenizer and a 10-document dataset (split 8,1,1), for tests of
evaluation, generation and serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers.checkpoints import save_random_checkpoint
from neox_llama.data.indexed import IndexedDatasetWriter
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.train import train_sentencepiece

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness. ") * 3
SETTINGS = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 96,
            "seq_length": 32, "max_position_embeddings": 64, "make_vocab_size_divisible_by": 64, "precision": "fp32",
            "rotary_emb_base": 500000.0, "no_weight_tying": True}


def evaluation_checkpoint(tmp: Path) -> Path:
    """In ``tmp``: text.jsonl, the tokenizer tok.model trained on it, the dataset docs and the checkpoint ck."""
    (tmp / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    tokenizer = train_sentencepiece([tmp / "text.jsonl"], tmp / "tok", 320)
    tok = build_tokenizer("SPMTokenizer", tokenizer)
    with IndexedDatasetWriter(tmp / "docs", np.uint16) as writer:  # 10 documents; split 8,1,1 -> the last is test
        for i in range(10):
            writer.add_document(tok.encode_document(f"Document {i}: " + TEXT[: 60 + 9 * i]))
    settings = {**SETTINGS, "data_path": str(tmp / "docs"), "split": "8,1,1"}
    save_random_checkpoint(tmp / "ck", settings, tokenizer_type="SPMTokenizer", tokenizer_file=tokenizer)
    return tmp
