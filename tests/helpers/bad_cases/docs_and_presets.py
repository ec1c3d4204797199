"""What a newcomer meets first: a save directory whose ``latest`` is empty (the error lists the checkpoints there),
instruction records on top of an inherited ``data_path`` (the error says how to clear it), and configs named by a
shipped name that does not exist (``--preset``, or a file that is neither here nor shipped)."""

from __future__ import annotations

import json

from helpers import inprocess
from helpers.bad_inputs import copy_run, tool, tree_hash
from helpers.runner import ROOT


def case_docs_empty_latest(world, tmp_path):
    run_dir = copy_run(world, tmp_path)
    (run_dir / "ck/latest").write_text("")
    before = tree_hash(run_dir / "ck")
    proc = tool("generate.py", "--checkpoint", run_dir / "ck", "--prompt", "x", "--max-new-tokens", "2")
    ck = run_dir / "ck"
    return proc, f"{ck}/latest is empty; the complete checkpoints in {ck}: global_step2; write one of them into " \
                 f"{ck}/latest, or load one directly (e.g. {ck}/global_step2)", [(ck, before)]


def case_docs_sft_data_path_with_an_inherited_data_path(world, tmp_path):
    records = tmp_path / "sft.json"
    records.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}] * 4))
    base = tmp_path / "base.yml"
    base.write_text(f"data_path: {world['w'] / 'data_text_document'}\ntokenizer_type: SPMTokenizer\n"
                    f"vocab_file: {world['tok']}\nvocab_size: null\nsave: {tmp_path / 'r'}\n")
    sft = tmp_path / "sft.yml"
    sft.write_text(f"sft_data_path: {records}\n")
    proc = inprocess.deepy("train.py", "configs/llama3/tiny.yml", str(base), str(sft), cwd=ROOT)
    assert not (tmp_path / "r").exists(), "deepy.py wrote into save before refusing the config"
    return proc, f"{sft}: sft_data_path (instruction records) and data_path (token data, set by {base}) are both " \
                 f"set; train on one of them: to fine-tune on the records, clear the inherited data_path with " \
                 f"`data_path: null` in {sft} (or data_path=null on the command line)", []


def case_docs_unknown_preset_name(world, tmp_path):
    proc = inprocess.deepy(str(ROOT / "train.py"), "--preset", "llama3/tny", "local.yml", "--dry-run", cwd=tmp_path)
    return proc, "--preset llama3/tny: no config of that name ships with neox_llama (did you mean 'llama3/tiny'?); " \
                 "shipped: finetune/adapter,", []


def case_docs_config_neither_here_nor_shipped(world, tmp_path):
    proc = inprocess.deepy(str(ROOT / "train.py"), "llama3/tinyy", "--dry-run", cwd=tmp_path)
    return proc, "llama3/tinyy: config file not found, here or among the configs shipped with neox_llama (did you " \
                 "mean 'llama3/tiny'?)", []
