"""Fine-tuning runs through deepy.py on instruction records: a sentencepiece tokenizer, the records, a random base
checkpoint of the tiny preset (built once per session: conftest's ``finetune_setup``), and the run command."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.checkpoints import save_random_checkpoint
from helpers.runner import ROOT, free_port, ok  # noqa: F401 (ok: the fine-tuning tests import it from here)
from helpers.training import start_deepy
from neox_llama.config.loading import load_raw
from neox_llama.tokenizers.train import train_sentencepiece

PRESET = "configs/llama3/tiny.yml"
WORDS = "apple river stone cloud green seven quiet ember violet north market candle".split()
COMMON = ["seq_length=64", "precision=fp32", "log_interval=1", "num_workers=0", "tensorboard_dir=null",
          "train_micro_batch_size_per_gpu=2", "warmup_iters=1", "eval_iters=1", "make_vocab_size_divisible_by=64",
          "peak_tflops=1"]  # a set peak: no matmul-peak probe at start-up
LORA = ["lora_r=8", "lora_alpha=4", "lora_dropout=0", "lora_targets=[query,value,mlp]", "val_split_fraction=0.2",
        "prompt_style=alpaca", "optimizer.params.lr=1e-2"]


def records(n=40):
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3)]
        out.append({"instruction": f"Repeat the words: {' '.join(words)}", "input": "", "output": " ".join(words)})
    return out


def build_setup(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """In ``tmp``: instruction records sft.json, their text.jsonl, a sentencepiece tokenizer trained on it and a
    random base checkpoint of the tiny preset; returns (tmp, records, tokenizer, base)."""
    data = tmp / "sft.json"
    data.write_text(json.dumps(records()))
    text = tmp / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"{r['instruction']} {r['output']}"}) for r in records()) + "\n")
    tokenizer = train_sentencepiece([text], tmp / "tok", 384)
    raw, _ = load_raw([ROOT / PRESET], apply_presets=False)
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
            "rotary_emb_base", "max_position_embeddings", "no_weight_tying", "make_vocab_size_divisible_by")
    settings = {k: raw[k] for k in keys} | {"seq_length": 64, "precision": "fp32"}
    save_random_checkpoint(tmp / "base", settings, tokenizer_type="SPMTokenizer", tokenizer_file=tokenizer, seed=5)
    return tmp, data, tokenizer, tmp / "base"


_SHARED: dict[str, tuple[Path, Path, Path, Path]] = {}


def shared_setup() -> tuple[Path, Path, Path, Path]:
    """:func:`build_setup` in the session's shared folder, once per session (conftest's ``finetune_setup`` and the
    multi-rank cases that fine-tune the same base)."""
    if "setup" not in _SHARED:
        from helpers import training

        if training.SESSION_DIR is None:
            raise RuntimeError("shared_setup() needs the test session (conftest.py sets SESSION_DIR)")
        (training.SESSION_DIR / "finetune").mkdir()
        _SHARED["setup"] = build_setup(training.SESSION_DIR / "finetune")
    return _SHARED["setup"]


def deepy_args(save, tokenizer, *overrides) -> list[str]:
    """``deepy.py`` arguments fine-tuning (or training) the tiny preset into ``save`` (checkpoints, logs/)."""
    return ["train.py", PRESET, *COMMON, "tokenizer_type=SPMTokenizer", f"vocab_file={tokenizer}", f"save={save}",
            f"log_dir={save}/logs", f"master_port={free_port()}", *overrides]


def deepy(save, tokenizer, *overrides, wait=True):
    """``python deepy.py train.py`` on the tiny preset (helpers.training.start_deepy: in this process for one
    rank when waited for; without wait, a running process)."""
    return start_deepy(deepy_args(save, tokenizer, *overrides), wait=wait)


def metrics(save, key="loss"):
    return [r for r in map(json.loads, (save / "logs" / "metrics.jsonl").read_text().splitlines()) if key in r]
