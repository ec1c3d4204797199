"""A served checkpoint as users run it: tools/serve.py in a subprocess on a free port of 127.0.0.1, with a base,
a LoRA adapter ``a`` and an Adapter v2 ``b`` (llama2-chat), written once per test module."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from helpers.adapter import adapter_checkpoint as v2_checkpoint
from helpers.checkpoints import save_random_checkpoint
from helpers.evaluation import SETTINGS, TEXT
from helpers.lora import adapter_checkpoint
from helpers.runner import ROOT, free_port
from neox_llama.peft.adapter import AdapterSettings
from neox_llama.peft.lora import LoraSettings
from neox_llama.tokenizers.train import train_sentencepiece

CONTEXT = 256
"""The served checkpoints' context (max_position_embeddings)."""


def served_checkpoints(root: Path) -> Path:
    """``root``/tok.model, ``root``/base, ``root``/a (LoRA on query, value and the head), ``root``/b (Adapter v2)."""
    (root / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    tokenizer = train_sentencepiece([root / "text.jsonl"], root / "tok", 320)
    settings = {**SETTINGS, "max_position_embeddings": CONTEXT}
    save_random_checkpoint(root / "base", settings, tokenizer_type="SPMTokenizer", tokenizer_file=tokenizer)
    adapter_checkpoint(root / "a", root / "base", LoraSettings(4, 8.0, 0.0, ("query", "value", "head")), seed=1)
    v2_checkpoint(root / "b", root / "base", AdapterSettings("adapter_v2", 4, 0), seed=2, style="llama2-chat")
    return root


@contextmanager
def running_server(folders: Path, *extra: str, log_name: str = "serve.log", adapters: dict[str, Path] | None = None,
                   base: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """tools/serve.py on ``base`` (default: ``folders``' base) with ``adapters`` (name -> checkpoint; default: a and b)
    and ``extra`` flags, its log in ``folders``; yields (url, process)."""
    port = free_port()
    log_path = folders / log_name
    adapters = adapters if adapters is not None else {"a": folders / "a", "b": folders / "b"}
    named = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), "--checkpoint",
                                 str(base or folders / "base"), *named, "--port", str(port), *extra],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(120):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
                if proc.poll() is not None:
                    pytest.fail(log_path.read_text())
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
