#!/usr/bin/env python
"""Launch a neox_llama script on every rank.

    python deepy.py train.py CONFIG.yml [CONFIG.yml ...] [key=value ...] [--dry-run] [--force]

Config files merge left to right, then ``key=value`` overrides (dotted for nested keys, e.g.
``optimizer.params.lr=1e-4``). The merged config is validated for the world it will run in before
any process starts; it is then written to ``{log_dir}/config.yml`` and every rank reads that file.
One rank runs the script directly; more go through DeepSpeed's launcher.

Before that, the datasets, a resume target's shapes and (without GPUs) the host memory are checked
(neox_llama/planning/preflight.py); ``--force`` starts even when the memory estimate exceeds this machine's RAM.
``--dry-run`` prints the plan and turns every refusal into a warning.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neox_llama.cli import runner

if TYPE_CHECKING:
    from neox_llama.planning.launch import LaunchCommand

USAGE = "usage: python deepy.py SCRIPT.py CONFIG.yml [CONFIG.yml ...] [key=value ...] [--dry-run] [--force]"


def parse_args(argv: list[str]) -> tuple[str, list[str], list[str], bool, bool]:
    """Split the command line into the script, config files, overrides, and the dry-run and force flags."""
    dry_run = force = False
    positional: list[str] = []
    for arg in argv:
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--force":
            force = True
        elif arg in ("-h", "--help"):
            print(__doc__.strip())
            sys.exit(0)
        elif arg.startswith("--"):
            _usage_error(f"deepy.py: error: unknown option {arg}\n{USAGE}")
        else:
            positional.append(arg)
    if not positional or not positional[0].endswith(".py"):
        _usage_error(f"deepy.py: error: the first argument must be the script to run (e.g. train.py)\n{USAGE}")
    script, rest = positional[0], positional[1:]
    if not Path(script).is_file():
        _usage_error(f"deepy.py: error: script {script} not found")
    files = [a for a in rest if _is_config_file(a)]
    overrides = [a for a in rest if not _is_config_file(a)]
    if not files:
        _usage_error(f"deepy.py: error: no config file given\n{USAGE}")
    return script, files, overrides, dry_run, force


def _neox_hints(files: list[str], problems: list[str]) -> list[str]:
    """A line per config file that looks like GPT-NeoX's, saying how to translate it (before its unknown keys)."""
    if not any("unknown key" in p for p in problems):
        return []
    from neox_llama.config.neox_translate import looks_like_neox

    found = {file: keys for file in files if (keys := looks_like_neox(Path(file)))}
    if not found:
        return []
    which = "; ".join(f"{file} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" for file, keys in found.items())
    return [f"this looks like a GPT-NeoX config: {which}; translate it first with "
            f"python tools/convert_neox_config.py {' '.join(found)} --output ours.yml (see docs/from_gpt_neox.md)"]


def _usage_error(message: str) -> None:
    """A command-line mistake: the message on stderr, exit status 2 (as for config errors)."""
    print(message, file=sys.stderr)
    sys.exit(2)


def _is_config_file(arg: str) -> bool:
    return arg.endswith((".yml", ".yaml")) or "=" not in arg or Path(arg).is_file()


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def tokenizer_vocab_size(cfg, problems: list[str]) -> int | None:
    """The vocabulary of ``vocab_file`` (so the padded vocabulary can be checked before launch)."""
    if not cfg.vocab_file or not cfg.tokenizer_type or "vocab_file" in cfg.invalid_keys:
        return None
    from neox_llama.tokenizers import TokenizerError, build_tokenizer

    try:
        return build_tokenizer(cfg.tokenizer_type, cfg.vocab_file).vocab_size
    except TokenizerError as err:
        problems.append(f"{cfg.sources.get('vocab_file', 'default')}: {err}")
        return None


@runner.command("deepy.py")
def main(argv: list[str]) -> int:
    """Check the config, write it to ``{log_dir}/config.yml`` and replace this process with the launch."""
    prepared = prepare_launch(argv)
    if isinstance(prepared, int):
        return prepared
    logging.getLogger("deepy").info("starting %d rank(s): %s", prepared.world_size, prepared.command.shell(abbreviate=True))
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process, so signals (Ctrl-C, SIGTERM from a scheduler) reach the launcher or the rank directly.
    command = prepared.command
    os.execve(command.argv[0], command.argv, {**os.environ, **command.env})
    return 1  # not reached


@dataclass
class PreparedLaunch:
    """A checked run, its merged config written: what :func:`main` starts (and a host process may start itself)."""

    command: LaunchCommand
    """The launch command (a single rank: ``python SCRIPT --config FILE`` with the rank environment)."""
    world_size: int
    """How many ranks the command starts."""
    config_file: str
    """The merged config every rank reads."""


def prepare_launch(argv: list[str]) -> PreparedLaunch | int:
    """Everything :func:`main` does before it starts the ranks: an exit status (problems, a dry run) or the launch."""
    script, files, overrides, dry_run, force = parse_args(argv)
    from neox_llama.planning.launch import detect_accelerator

    accelerator = detect_accelerator()
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no probing, no warning

    from neox_llama.config import ConfigError, resolve
    from neox_llama.config.loading import build_config, dump_raw_text, load_raw
    from neox_llama.planning.launch import build_launch_command, plan_resources
    from neox_llama.utils.files import atomic_write_text
    from neox_llama.utils.logging_setup import setup_logging

    setup_logging("info", rank=0)
    problems: list[str] = []
    try:
        raw, sources = load_raw(files, overrides)
    except ConfigError as err:
        problems.extend(err.problems)
    else:
        cfg = build_config(raw, sources, problems=problems)
        try:
            plan = plan_resources(cfg, accelerator)
            world_size = plan.world_size
        except ConfigError as err:
            problems.extend(err.problems)
            world_size = (cfg.num_gpus or 1) * (cfg.num_nodes or 1)
        if cfg.finetune and cfg.load and "load" not in cfg.invalid_keys:
            from neox_llama.checkpoint.paths import CheckpointError, resolve_checkpoint

            try:
                resolve_checkpoint(cfg.load)
            except CheckpointError as err:
                problems.append(f"{cfg.sources.get('load', 'default')}: load: {err} (finetune needs a checkpoint)")
        tokenizer_vocab = tokenizer_vocab_size(cfg, problems)
        try:
            resolve(cfg, world_size, accelerator, tokenizer_vocab=tokenizer_vocab,
                    bf16_supported=accelerator != "cuda" or _cuda_bf16())
        except ConfigError as err:
            problems.extend(err.problems)
    if not problems:
        from neox_llama.planning import preflight

        vocab = cfg.vocab_size or tokenizer_vocab
        checks = preflight.check_datasets(cfg, vocab) + preflight.check_resume_target(cfg) + preflight.check_offload(cfg)
        # This machine's RAM and files stand for the ranks' only when they run here (not on a hostfile's nodes).
        memory = preflight.check_host_memory(cfg, plan.ranks_per_node) \
            if accelerator == "cpu" and not plan.multi_node else []
        if dry_run or plan.multi_node:  # a plan for the target cluster, or files on other machines: warn only
            for line in checks + memory:
                print(f"deepy.py: warning: {line}", file=sys.stderr)
        else:
            problems.extend(checks + ([] if force else memory))
            for line in memory if force else []:
                print(f"deepy.py: warning: {line} (--force: starting anyway)", file=sys.stderr)
    if problems:
        problems = _neox_hints(files, problems) + problems
        for line in problems:
            print(f"deepy.py: error: {line}", file=sys.stderr)
        print(f"deepy.py: {len(problems)} problem(s) in the config; nothing was started", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, rank=0)

    if cfg.log_dir is None:  # resolved here once, so that every rank agrees on it
        cfg.log_dir = str(Path(cfg.save) / "logs") if cfg.save else f"runs/{time.strftime('%Y%m%d-%H%M%S')}/logs"
        raw["log_dir"] = cfg.log_dir
    config_file = str(Path(cfg.log_dir) / "config.yml")
    header = f"# merged by deepy.py from: {' '.join(files + overrides)}"
    config_text = dump_raw_text(raw, header=header)
    command = build_launch_command(cfg, plan, script, config_file, config_text)

    if dry_run:
        from neox_llama.planning.report import dry_run_text

        print(dry_run_text(cfg, plan, command, config_file))
        return 0

    atomic_write_text(config_file, config_text)
    return PreparedLaunch(command, plan.world_size, config_file)


@runner.command("deepy.py")
def train_main(argv: list[str]) -> int:
    """``neox-train CONFIG.yml ... [key=value ...] [--dry-run] [--force]``: the same as ``python deepy.py train.py ...``."""
    from neox_llama.cli import train

    return main([train.__file__, *argv])


if __name__ == "__main__":
    sys.exit(main())
