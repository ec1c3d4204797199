"""The README's and docs' commands run as written: every script exists and takes the flags shown, and a listed
subset (the demo, then generation and export from its checkpoint, and the documented dry run) really runs."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from helpers.inprocess import deepy, tool
from helpers.runner import ROOT, run

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN_AS_WRITTEN = [
    "python tools/prepare_data.py",
    "python deepy.py train.py configs/llama3/tiny.yml configs/local.yml",
    "python tools/plot_metrics.py runs/local/logs/metrics.jsonl",
    'python tools/generate.py --checkpoint runs/local/checkpoints --prompt "ROMEO:" --max-new-tokens 64',
    "python tools/convert_to_hf.py --checkpoint runs/local/checkpoints --output runs/local/hf",
    "python deepy.py train.py configs/llama2/7B.yml configs/local.yml num_gpus=8 model_parallel_size=2 "
    "pipe_parallel_size=2 train_batch_size=64 --dry-run",
    "python deepy.py train.py configs/llama3/tiny.yml configs/finetune/lora.yml",
    "python tools/merge_lora.py --checkpoint runs/lora/checkpoints/global_step200 --output runs/lora/merged",
    'python tools/generate.py --checkpoint runs/lora/checkpoints/global_step200 --prompt "Name a colour." '
    "--prompt-style alpaca",
    "python tools/convert_to_hf.py --checkpoint runs/lora/checkpoints/best --output runs/lora/peft --peft",
]
"""Run in this order in a copy of the repository (the demo makes the data and the checkpoint the rest use)."""


def documented_commands() -> list[tuple[Path, str]]:
    """Every ``python ...`` line of a bash block in the README and docs (continuations joined, comments cut)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("python "):
                    found.append((doc, re.sub(r"\s+#.*$", "", line)))
    return found


def _written(command: str) -> str:
    """The command without its optional parts (``[...]``), as a user types it."""
    return re.sub(r"\s*\[[^\]]*\]", "", command).strip()


def test_every_documented_script_exists_and_takes_the_flags_shown():
    commands = documented_commands()
    assert len(commands) >= 8
    helps: dict[str, str] = {}
    for doc, command in commands:
        words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))
        if words[1] == "-m":
            module = words[2]
            assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), (doc.name, command)
            continue
        script = words[1]
        assert (ROOT / script).is_file(), (doc.name, command)
        if script == "deepy.py":
            assert words[2] == "train.py" or words[2].endswith(".py"), command
            continue
        if script not in helps:
            proc = run([sys.executable, str(ROOT / script), "--help"], timeout=120)
            assert proc.returncode == 0, (script, proc.stderr[-1000:])
            helps[script] = proc.stdout
        for flag in (w for w in words if w.startswith("--")):
            assert flag.split("=")[0] in helps[script], f"{doc.name}: {command}: {script} has no {flag}"


@pytest.mark.dist
def test_the_listed_commands_run_as_written(tmp_path):
    written = {_written(c) for _, c in documented_commands()}
    missing = [c for c in RUN_AS_WRITTEN if c not in written]
    assert not missing, f"listed commands no longer in the docs: {missing}"
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", "__pycache__",
                                                                ".pytest_cache", ".ruff_cache", "build"))
    if (ROOT / ".cache").exists():  # assets already fetched through pip (prepare_data fetches them otherwise)
        shutil.copytree(ROOT / ".cache", copy / ".cache", dirs_exist_ok=True)
    for command in RUN_AS_WRITTEN:
        words = shlex.split(command)
        script = words[1]
        if script == "deepy.py":  # its checks, then one rank, in this process (test_deepy.py runs the real exec)
            proc = deepy(*words[2:], cwd=copy)
        elif (ROOT / "neox_llama" / "cli" / Path(script).name).is_file():  # the tool's main(argv), in this process
            proc = tool(Path(script).name, *words[2:], cwd=copy)
        else:  # a real process: the scripts that live in tools/ alone
            proc = run([sys.executable, *words[1:]], cwd=copy, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (copy / "runs/local/hf/config.json").is_file() and (copy / "runs/local/logs/metrics.png").is_file()
    assert (copy / "runs/lora/merged/metadata.json").is_file() and (copy / "runs/lora/peft/adapter_config.json").is_file()
