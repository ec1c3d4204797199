"""The README's and docs' commands run as written: every script exists and takes the flags shown, and the listed
ones really run, in the order a reader meets them, on a copy of the repository: first the demo's commands (what
``make demo`` runs), then every later command that uses a tiny preset or the demo's outputs, which is where a
newcomer runs them (the large presets only as a dry run)."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from helpers.inprocess import call, deepy, tool
from helpers.runner import ROOT, run

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

DEMO = [
    "python tools/prepare_data.py",
    "python deepy.py train.py configs/llama3/tiny.yml configs/local.yml",
    "python tools/plot_metrics.py runs/local/logs/metrics.jsonl",
    "python deepy.py train.py configs/llama3/tiny.yml configs/finetune/lora.yml",
    "python tools/merge_lora.py --checkpoint runs/lora/checkpoints/global_step200 --output runs/lora/merged",
]
"""The README's list of what ``make demo`` runs (the Makefile's demo target, less its chat)."""

AFTER_THE_DEMO = [
    "python deepy.py train.py configs/llama2/7B.yml configs/local.yml num_gpus=8 model_parallel_size=2 "
    "pipe_parallel_size=2 train_batch_size=64 --dry-run",
    "python tools/convert_to_hf.py --checkpoint runs/local/checkpoints --output runs/local/hf",
    'python tools/generate.py --checkpoint runs/local/checkpoints --prompt "ROMEO:" --max-new-tokens 64',
    "python tools/merge_lora.py --checkpoint runs/lora/checkpoints/best --output runs/lora/merged_best",
    "python tools/convert_to_hf.py --checkpoint runs/lora/checkpoints/best --output runs/lora/peft --peft",
    "python tools/evaluate.py --checkpoint runs/local/checkpoints --data-path data/shakespeare_text_document "
    "--output runs/local/eval.json",
    "python tools/evaluate.py --checkpoint runs/local/checkpoints --adapter runs/lora/checkpoints/best "
    "--text data/macbeth.txt --seq-length 128",
    "python tools/evaluate.py --checkpoint runs/local/checkpoints --tasks neox_tiny_mc --include-path tests/data/lm_eval",
    "python tools/convert_neox_config.py tests/data/gpt_neox/llama2/7B.yml --output llama2_7b.yml --vocab-size 32000",
    "neox-train llama3/tiny local.yml --dry-run",
    "python tools/merge_lora.py --checkpoint runs/lora/checkpoints/global_step300 --output runs/lora/merged_300",
    'python tools/generate.py --checkpoint runs/lora/checkpoints/global_step200 --prompt "Name a colour." '
    "--prompt-style alpaca",
    "python tools/convert_neox_config.py tests/data/gpt_neox/llama2/7B.yml tests/data/gpt_neox/llama/train_config.yml "
    "--output ours.yml --vocab-size 32000 --drop-unsupported",
    "python deepy.py train.py ours.yml configs/local.yml precision=bf16 --dry-run",
]
"""README top to bottom, then docs/finetuning.md and docs/from_gpt_neox.md: a reader's order after the demo."""

RUN_AS_WRITTEN = DEMO + AFTER_THE_DEMO


def documented_commands() -> list[tuple[Path, str]]:
    """Every ``python ...`` and ``neox-...`` line of a code block in the README and docs (continuations joined,
    comments cut), in the order a reader meets them."""
    found = []
    for doc in DOCS:
        for language, block in re.findall(r"^```(\w*)\n(.*?)^```", doc.read_text(encoding="utf-8"), re.S | re.M):
            if language not in ("", "bash", "sh"):  # a ```python block is code, not commands
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith(("python ", "neox-")):
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
        if words[0] == "neox-train":  # deepy.py's own parser: tested by running it (test_deepy.py, below)
            continue
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
    order = [_written(c) for _, c in documented_commands()]
    missing = [c for c in RUN_AS_WRITTEN if c not in order]
    assert not missing, f"listed commands no longer in the docs: {missing}"
    met = [order.index(c) for c in AFTER_THE_DEMO]
    assert met == sorted(met), "AFTER_THE_DEMO is not in the order the README and docs show its commands"
    copy = tmp_path / "repo"  # a fresh clone: what git tracks (tests/data too), none of the top-level outputs
    anywhere = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
    top = {".venv", ".git", "runs", "data", "build", ".cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(anywhere(folder, names)) | (top & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, copy, ignore=ignore)
    if (ROOT / ".cache").exists():  # assets already fetched through pip (prepare_data fetches them otherwise)
        shutil.copytree(ROOT / ".cache", copy / ".cache", dirs_exist_ok=True)
    for command in RUN_AS_WRITTEN:
        words = shlex.split(command)
        script = words[1]
        if words[0] == "neox-train":  # the console script's main, in this process, named as the script is
            from neox_llama.cli.deepy import train_main

            proc = call(train_main, words[1:], cwd=copy, args=[sys.executable, "/venv/bin/neox-train", *words[1:]])
        elif script == "deepy.py":  # its checks, then one rank, in this process (test_deepy.py runs the real exec)
            proc = deepy(*words[2:], cwd=copy)
        elif (ROOT / "neox_llama" / "cli" / Path(script).name).is_file():  # the tool's main(argv), in this process
            proc = tool(Path(script).name, *words[2:], cwd=copy)
        else:  # a real process: the scripts that live in tools/ alone
            proc = run([sys.executable, *words[1:]], cwd=copy, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (copy / "runs/local/hf/config.json").is_file() and (copy / "runs/local/logs/metrics.png").is_file()
    assert (copy / "runs/lora/merged/metadata.json").is_file() and (copy / "runs/lora/peft/adapter_config.json").is_file()
    assert (copy / "runs/lora/merged_best/metadata.json").is_file() and (copy / "runs/local/eval.json").is_file()
    assert (copy / "llama2_7b.yml").is_file() and (copy / "ours.yml").is_file()
