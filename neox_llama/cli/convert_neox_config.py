#!/usr/bin/env python
"""Translate GPT-NeoX config files into one neox_llama config, with a report of every key.

    python tools/convert_neox_config.py NEOX.yml [NEOX2.yml ...] --output OURS.yml [--vocab-size N] [--drop-unsupported]

The files merge as GPT-NeoX merges them (hyphenated keys included). Each key is translated, dropped because
neox_llama chooses it by itself, or reported as having no equivalent; the last stops the translation (exit 2,
nothing written) unless --drop-unsupported. OURS.yml says on every line where its value came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.errors import NeoxLlamaError


def _section(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n" + "".join(f"  {line}\n" for line in lines)


@command("convert_neox_config.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("configs", nargs="+", help="GPT-NeoX YAML files, merged left to right as GPT-NeoX does")
    parser.add_argument("--output", required=True, help="neox_llama config to write")
    parser.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary (GPT-NeoX model files carry none)")
    parser.add_argument("--drop-unsupported", action="store_true",
                        help="drop every key without an equivalent (GPT-NeoX's or not) instead of stopping")
    parser.add_argument("--force", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)

    from neox_llama.config.neox_translate import preset_check, render_yaml, translate
    from neox_llama.utils.files import atomic_write_text

    files = [Path(p) for p in args.configs]
    output = Path(args.output)
    if output.exists() and not args.force:
        raise NeoxLlamaError(f"{output}: exists; choose another --output or pass --force")
    result = translate(files, args.vocab_size)
    report = _section("translated", result.translated) + _section(
        "dropped: neox_llama chooses these itself", result.automatic) + _section("no equivalent", result.unsupported)
    name, diffs = preset_check(result.settings)
    if name:
        report += f"same shape as the preset {name}" + (": differs in\n" if diffs else ", no other difference\n")
        report += "".join(f"  {d}\n" for d in diffs)
    report += "".join(f"note: {n}\n" for n in result.notes)
    print(report, end="")
    if result.unsupported and not args.drop_unsupported:
        raise NeoxLlamaError(f"{len(result.unsupported)} key(s) have no equivalent (listed above); "
                             "pass --drop-unsupported to translate without them; nothing was written")
    text = render_yaml(result, files)
    problems = _read_back(text)  # our own loader must accept it, before anything is written
    if problems:
        raise NeoxLlamaError("\n".join(f"the translation does not validate: {line}" for line in problems))
    atomic_write_text(output, text)
    print(f"wrote {output}" + (f" (dropped {len(result.unsupported)} key(s) without an equivalent)"
                               if result.unsupported else ""))
    return 0


def _read_back(text: str) -> list[str]:
    """Problems our loader finds in the translated text (unknown keys, types, ranges)."""
    import tempfile

    from neox_llama.config.loading import build_config, load_raw

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "translated.yml"
        path.write_text(text, encoding="utf-8")
        problems: list[str] = []
        build_config(*load_raw([path], apply_presets=False), problems=problems)
    return [p.replace(str(path), "translated config") for p in problems]


console_main = main  # neox-convert-neox-config


if __name__ == "__main__":
    sys.exit(main())
