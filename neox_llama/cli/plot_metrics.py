#!/usr/bin/env python
"""Draw training and validation loss, learning rate and tokens/s from a metrics.jsonl file to a PNG.

    python tools/plot_metrics.py runs/local/logs/metrics.jsonl [--output runs/local/logs/metrics.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neox_llama.cli.runner import command
from neox_llama.errors import NeoxLlamaError


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl file (blank lines skipped); a line that is not JSON is an error."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise NeoxLlamaError(f"{path}:{number}: not a JSON record") from None
    return records


@command("plot_metrics.py")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="metrics.jsonl written by train.py")
    parser.add_argument("--output", help="PNG to write (default: beside the metrics file)")
    args = parser.parse_args(argv)
    path = Path(args.metrics)
    if not path.is_file():
        raise NeoxLlamaError(f"{path} not found")
    records = read_records(path)
    train = [r for r in records if r.get("loss") is not None]
    valid = [r for r in records if r.get("valid_loss") is not None]
    if not train:
        raise NeoxLlamaError(f"{path} has no training records (step, loss)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if valid:
        ax_loss.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_ylabel("learning rate")
    ax_tps.plot([r["step"] for r in train], [r["tokens_per_sec"] for r in train])
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_xlabel("step")
    fig.suptitle(str(path))
    fig.tight_layout()
    output = Path(args.output) if args.output else path.with_suffix(".png")
    tmp = output.with_name(output.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
