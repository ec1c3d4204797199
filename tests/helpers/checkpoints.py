"""Checkpoints written in-process, as one training rank writes them (random weights; no engine state)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from neox_llama.checkpoint.metadata import Layout, Metadata, write_metadata
from neox_llama.checkpoint.paths import layer_file
from neox_llama.checkpoint.weights import write_layer_file
from neox_llama.config import load_config
from neox_llama.model.args import LlamaArgs
from neox_llama.model.llama import build_model
from neox_llama.tokenizers import build_tokenizer

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 96,
        "seq_length": 32, "vocab_size": 128, "make_vocab_size_divisible_by": 64, "precision": "fp32",
        "rotary_emb_base": 500000.0}


def save_random_checkpoint(folder: Path, settings: dict = TINY, *, tokenizer_type: str | None = None,
                           tokenizer_file: Path | None = None, step: int = 7, seed: int = 1234):
    """A complete checkpoint folder of a freshly initialised model; returns the model (eval mode)."""
    folder.mkdir(parents=True)
    settings = {**settings, "seed": seed}
    files = []
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / tokenizer_file.name)
        files = [tokenizer_file.name]
        settings = {**settings, "tokenizer_type": tokenizer_type, "vocab_file": tokenizer_file.name}
        settings.pop("vocab_size", None)
    (folder / "config.yml").write_text(yaml.safe_dump(settings))
    vocab = build_tokenizer(tokenizer_type, tokenizer_file).vocab_size if tokenizer_file else None
    cfg = load_config([folder / "config.yml"], [f"vocab_file={folder / files[0]}"] if files else [],
                      apply_presets=False, tokenizer_vocab=vocab)
    model = build_model(LlamaArgs.from_config(cfg))
    for index, layer in model.named_children():
        tensors = {n: p.detach().clone() for n, p in layer.named_parameters()}
        if tensors:
            write_layer_file(layer_file(folder, int(index)), tensors)
    write_metadata(folder, Metadata(tag=folder.name, step=step, layout=Layout(zero_stage=0), tokenizer_files=files))
    return model.eval()
