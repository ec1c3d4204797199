#!/usr/bin/env python
"""Launch a neox_llama script on every rank.

    python deepy.py train.py CONFIG [CONFIG ...] [key=value ...] [--preset NAME] [--dry-run] [--force]
    neox-train CONFIG [CONFIG ...] [key=value ...] [--preset NAME] [--dry-run] [--force]   (the same, for train.py)

Config files merge left to right, then ``key=value`` overrides (dotted for nested keys, e.g.
``optimizer.params.lr=1e-4``). The merged config is validated for the world it will run in before
any process starts; it is then written to ``{log_dir}/config.yml`` and every rank reads that file.
One rank runs the script directly; more go through DeepSpeed's launcher.

A CONFIG that is a file here is read; one that is not is looked up among the configs shipped with neox_llama
(the repository's configs/, installed as the package data neox_llama.configs), by its name under configs/ with
or without ``configs/`` and ``.yml`` (``llama3/tiny``, ``configs/llama3/tiny.yml``, ``local.yml``,
``finetune/lora``) or by a model name (``tiny-llama3``, ``Meta-Llama-3-8B``). ``--preset NAME`` reads the shipped
config of that name even when a file of that name exists here, at its place among the CONFIGs.
``model_name=NAME`` alone, without a CONFIG, starts from that model's preset.

Before that, the datasets, a resume target's shapes and (without GPUs) the host memory and cores are checked
(neox_llama/planning/preflight.py); ``--force`` starts even when the memory estimate exceeds this machine's RAM or
its ranks' threads are more than 4 per core. A ``master_port`` taken on this machine is replaced by a free one on a
single node (logged), and refused on several nodes. ``--dry-run`` prints the plan and turns every refusal into a
warning.
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

def invoked_as() -> str:
    """How this process was started, as its user typed it, from ``sys.argv[0]`` (where argparse takes its ``prog``):
    ``python deepy.py``, ``python -m neox_llama.cli.deepy``, or a console script's name such as ``neox-train``."""
    started = Path(sys.argv[0] if sys.argv and sys.argv[0] else "deepy.py")
    if started.suffix != ".py":
        return started.name
    if started.parent.name == "cli" and started.parent.parent.name == "neox_llama":
        return f"python -m neox_llama.cli.{started.stem}"
    return f"python {started.name}"


def usage(prog: str) -> str:
    """The usage line of ``prog`` (a console script such as neox-train names no script: it runs train.py)."""
    script = " SCRIPT.py" if prog.startswith("python") else ""
    return f"usage: {prog}{script} CONFIG [CONFIG ...] [key=value ...] [--preset NAME] [--dry-run] [--force]"


def help_text(prog: str) -> str:
    """``--help``: the usage line of ``prog``, this module's description and the names of the shipped configs."""
    from neox_llama.config.presets import shipped_names

    return f"{usage(prog)}\n\n{__doc__.strip()}\n\nshipped configs: {', '.join(shipped_names())}"


def parse_args(argv: list[str]) -> tuple[str, list[str], list[str], bool, bool]:
    """Split the command line into the script, config files, overrides, and the dry-run and force flags.

    ``--preset NAME`` becomes the shipped config's path, where it stands among the config files."""
    line = usage(invoked_as())
    dry_run = force = False
    entries: list[tuple[str, bool]] = []  # (argument, named by --preset)
    args = iter(argv)
    for arg in args:
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--force":
            force = True
        elif arg in ("-h", "--help"):
            print(help_text(invoked_as()))
            sys.exit(0)
        elif arg == "--preset" or arg.startswith("--preset="):
            name = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not name or name.startswith("--"):
                _usage_error(f"deepy.py: error: --preset needs a NAME, e.g. --preset llama3/tiny\n{line}")
            entries.append((_shipped(name, line), True))
        elif arg.startswith("--"):
            _usage_error(f"deepy.py: error: unknown option {arg}\n{line}")
        else:
            entries.append((arg, False))
    first = next((i for i, (_, preset) in enumerate(entries) if not preset), None)
    if first is None or not entries[first][0].endswith(".py"):
        _usage_error(f"deepy.py: error: the first argument must be the script to run (e.g. train.py)\n{line}")
    script, rest = entries[first][0], entries[:first] + entries[first + 1:]
    if not Path(script).is_file():
        _usage_error(f"deepy.py: error: script {script} not found")
    files = [a for a, preset in rest if preset or _is_config_file(a)]
    overrides = [a for a, preset in rest if not (preset or _is_config_file(a))]
    if not files and not any(o.partition("=")[0].strip() == "model_name" for o in overrides):
        _usage_error("deepy.py: error: no config file given: name a YAML file, a shipped config (llama3/tiny, "
                     f"local.yml, --preset NAME) or a model (model_name=tiny-llama3)\n{line}")
    return script, files, overrides, dry_run, force


def _shipped(name: str, line: str) -> str:
    """The path of the shipped config ``--preset name`` names; a usage error naming the shipped ones otherwise."""
    from neox_llama.config.presets import shipped_config, shipped_names
    from neox_llama.config.typecheck import did_you_mean

    path = shipped_config(name)
    if path is None:
        names = shipped_names()
        _usage_error(f"deepy.py: error: --preset {name}: no config of that name ships with neox_llama"
                     f"{did_you_mean(name.removeprefix('configs/').removesuffix('.yml'), names)}; shipped: "
                     f"{', '.join(names)}, or a model name such as tiny-llama3\n{line}")
    return str(path)


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

        # This machine's RAM, cores and files stand for the ranks' only when they run here (not on a hostfile's nodes).
        checks = preflight.run_checks(cfg, plan, cfg.vocab_size or tokenizer_vocab, accelerator)
        refused, warnings = checks.verdict(dry_run, force)
        for line in warnings:
            print(f"deepy.py: warning: {line}", file=sys.stderr)
        problems.extend(refused)
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
    command = build_launch_command(cfg, plan, script, config_file, config_text, checks.master_port)

    if dry_run:
        from neox_llama.planning.report import dry_run_text

        print(dry_run_text(cfg, plan, command, config_file))
        return 0

    atomic_write_text(config_file, config_text)
    return PreparedLaunch(command, plan.world_size, config_file)


@runner.command("deepy.py")
def train_main(argv: list[str]) -> int:
    """``neox-train CONFIG ... [key=value ...] [--preset NAME] [--dry-run] [--force]``: the same as
    ``python deepy.py train.py ...`` (its usage line names neox-train, as the console script is called)."""
    from neox_llama.cli import train

    return main([train.__file__, *argv])


if __name__ == "__main__":
    sys.exit(main())
