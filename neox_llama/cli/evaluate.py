#!/usr/bin/env python
"""Evaluate a checkpoint: loss, perplexity and bits per byte over text, JSONL or a token dataset.

    python tools/evaluate.py --checkpoint runs/local/checkpoints                      # the run's own test split
    python tools/evaluate.py --checkpoint DIR --text data/book.txt --seq-length 128 [--stride 64] [--output r.json]
    python tools/evaluate.py --checkpoint DIR --jsonl data/x.jsonl --jsonl-keys text
    python tools/evaluate.py --checkpoint DIR --data-path data/shakespeare_text_document
    python tools/evaluate.py --checkpoint BASE --adapter runs/lora/checkpoints/best --jsonl data/x.jsonl
    python tools/evaluate.py --checkpoint DIR --tasks hellaswag,my_task [--include-path DIR] [--num-fewshot N] [--limit N]
    python tools/evaluate.py --checkpoint runs/dpo/checkpoints --preference-data pairs.json [--reference CKPT]

Sliding window as Hugging Face's perplexity recipe (default stride: half the window, so every token after the
first is scored with context). A checkpoint trained at any pipeline/tensor layout is scored on one process.
--tasks runs lm-evaluation-harness through the registered `neox_llama` model (local task YAMLs with
--include-path work offline).
"""

from __future__ import annotations

import argparse
import sys

from neox_llama.cli.runner import command
from neox_llama.errors import NeoxLlamaError
from neox_llama.utils.files import atomic_write_text
from neox_llama.utils.logging_setup import setup_logging


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="save directory (uses latest) or global_stepN folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="ADAPTER_CHECKPOINT",
                        help="an adapter checkpoint trained on --checkpoint: LoRA (merged in at load; repeatable), "
                             "Adapter or Adapter v2 (attached; one)")
    parser.add_argument("--base", help="an adapter --checkpoint's base, when it is no longer where its metadata says")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data-path", help="a .bin/.idx dataset prefix (every document)")
    source.add_argument("--text", help="a UTF-8 text file, scored as one document")
    source.add_argument("--jsonl", help="a JSONL file; each --jsonl-keys field is one document")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"])
    source.add_argument("--preference-data", metavar="FILE",
                        help="preference pairs (JSON/JSONL, the formats of preference_data_path): the checkpoint's "
                             "DPO/IPO loss and TRL's reward metrics against --reference (a KTO checkpoint: labelled "
                             "completions, TRL's KTO metrics; a reward model: its pairwise accuracy)")
    parser.add_argument("--reference", help="the reference model of --preference-data (default: an adapter's base, "
                                            "or the checkpoint's recorded starting checkpoint)")
    parser.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (instead of perplexity)")
    parser.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--seq-length", type=int, help="window length (default: the run's seq_length)")
    parser.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--output", help="write the result as JSON here")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.seq_length is not None and args.seq_length < 2:
        parser.error("--seq-length must be at least 2")
    if args.stride is not None and args.stride < 1:
        parser.error("--stride must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.tasks and args.preference_data:
        parser.error("--tasks and --preference-data are two evaluations; give one")
    if args.reference and not args.preference_data:
        parser.error("--reference is the reference model of --preference-data; give that too")
    return args


@command("evaluate.py")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("warning")
    from neox_llama.evaluation import perplexity as ppl
    from neox_llama.generation.language_model import LanguageModel

    lm = LanguageModel.from_checkpoint(args.checkpoint, adapters=args.adapter, base=args.base, device=args.device)
    if lm.tokenizer is None:
        raise NeoxLlamaError("the checkpoint has no tokenizer to turn text into ids (and bytes)")
    if args.preference_data:
        return _preference(lm, args)
    lm.require_language_model("score text or run lm-eval tasks (token log-probabilities)")
    if args.tasks:
        return _tasks(lm, args)
    seq_length = args.seq_length or lm.run.cfg.seq_length
    stride = args.stride or max(1, seq_length // 2)
    if stride > seq_length:
        raise NeoxLlamaError(f"--stride {stride} is longer than the window {seq_length}; tokens between windows "
                             "would not be scored")
    total = None
    if args.text:
        documents = ppl.text_documents(lm, ppl.read_text(args.text))
    elif args.jsonl:
        documents = ppl.text_documents(lm, ppl.read_jsonl(args.jsonl, args.jsonl_keys))
    else:
        sources = [(args.data_path, 0, None)] if args.data_path else ppl.test_split_sources(lm)
        documents = (doc for prefix, first, last in sources for doc in ppl.dataset_documents(lm, prefix, first, last))
    result = ppl.evaluate_documents(lm, documents, seq_length, stride, args.batch_size,
                                    progress=not args.no_progress, total=total)
    if args.output:
        atomic_write_text(args.output, result.to_json() + "\n")
    print(result.summary())
    return 0


def _preference(lm, args: argparse.Namespace) -> int:
    """--preference-data: the loss and TRL's metrics against the reference, with the checkpoint's own settings."""
    from neox_llama.evaluation.preference import evaluate_pairs
    from neox_llama.generation.language_model import LanguageModel
    from neox_llama.model.preference_loss import PreferenceSettings

    run = lm.run
    recorded = next((a.metadata.preference for a in reversed(run.adapters) if a.metadata.preference), None) \
        or run.metadata.preference or {}
    if run.args.num_labels:  # a reward model: pairwise accuracy, no reference
        from neox_llama.evaluation.preference import evaluate_reward_pairs

        if args.reference:
            raise NeoxLlamaError(f"--reference: {args.checkpoint} is a reward model, which scores pairs without a "
                                 "reference model; drop --reference")
        margin_key = recorded.get("margin_key") or (run.cfg.rm_margin_key if run.cfg.preference_loss == "rm" else None)
        result = evaluate_reward_pairs(lm, args.preference_data, lm.run.prompt_style, args.seq_length,
                                       args.batch_size, margin_key)
        if args.output:
            atomic_write_text(args.output, result.to_json() + "\n")
        print(result.summary())
        return 0
    reference = args.reference
    if reference is None and run.adapters:
        reference = str(run.folder)  # the base with the adapters switched off
    elif reference is None and run.metadata.base is not None:
        reference = run.metadata.base.path
    if reference is None:
        raise NeoxLlamaError(f"--preference-data: {args.checkpoint} records no starting checkpoint to compare with; "
                             "pass --reference CHECKPOINT")
    settings = PreferenceSettings(recorded.get("loss", "dpo"), recorded.get("beta", 0.1),
                                  recorded.get("label_smoothing", 0.0),
                                  desirable_weight=recorded.get("desirable_weight", 1.0),
                                  undesirable_weight=recorded.get("undesirable_weight", 1.0))
    ref_lm = LanguageModel.from_checkpoint(reference, device=args.device)
    if settings.loss == "kto":  # labelled completions, the reference point per batch
        from neox_llama.evaluation.preference import evaluate_feedback

        result = evaluate_feedback(lm, ref_lm, args.preference_data, settings, lm.run.prompt_style, args.seq_length,
                                   args.batch_size)
    else:
        result = evaluate_pairs(lm, ref_lm, args.preference_data, settings, lm.run.prompt_style, args.seq_length,
                                args.batch_size)
    if args.output:
        atomic_write_text(args.output, result.to_json() + "\n")
    print(result.summary())
    return 0


def _tasks(lm, args: argparse.Namespace) -> int:
    import json

    from neox_llama.evaluation.harness import run_tasks

    tasks = [t for t in args.tasks.split(",") if t]
    try:
        out = run_tasks(lm, tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size)
    except (ValueError, KeyError, FileNotFoundError) as err:  # lm-eval's own errors for unknown tasks and data
        raise NeoxLlamaError(f"--tasks {args.tasks}: lm-eval: {str(err).splitlines()[0] if str(err) else err!r}") from None
    if out is None:
        raise NeoxLlamaError(f"--tasks {args.tasks}: lm-eval returned no results")
    if args.output:
        atomic_write_text(args.output, json.dumps({k: out[k] for k in ("results", "versions", "n-shot") if k in out},
                                                  indent=2, default=str) + "\n")
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    return 0


console_main = main  # neox-evaluate


if __name__ == "__main__":
    sys.exit(main())
