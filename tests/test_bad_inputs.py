"""Bad input at every entry point: a non-zero exit, the culprit named in one line, no traceback, and nothing that
was already written changed (hashed before and after)."""

from __future__ import annotations

import shutil

import pytest
from helpers import bad_cases, inprocess
from helpers.bad_inputs import copy_run as _copy_run
from helpers.bad_inputs import deepy as _deepy
from helpers.bad_inputs import make_world, tree_hash
from helpers.bad_inputs import process as _process
from helpers.bad_inputs import tool as _tool
from helpers.bad_inputs import train_py as _train_py
from helpers.bad_inputs import truncate as _truncate
from helpers.runner import ROOT

pytestmark = pytest.mark.dist


def case_deepy_missing_data(world, tmp_path):
    return _deepy(world, tmp_path / "r", corpus="nothing_here"), "nothing_here.idx: not found", []


def case_deepy_data_beyond_the_vocabulary(world, tmp_path):
    return _deepy(world, tmp_path / "r", corpus="wide"), "wide.bin holds token id 4999, but the model's vocabulary has 320", []


def case_deepy_resume_with_another_shape(world, tmp_path):
    run_dir = _copy_run(world, tmp_path)
    before = tree_hash(run_dir / "ck")
    proc = _deepy(world, run_dir, "train_iters=4", "intermediate_size=256")
    return proc, "layer_001.safetensors: mlp.gate.weight has shape (192, 64), the model expects (256, 64)", \
        [(run_dir / "ck", before)]


def case_deepy_resume_from_a_truncated_optimizer_file(world, tmp_path):
    run_dir = _copy_run(world, tmp_path)
    _truncate(run_dir / "ck/global_step2/optimizer/layer_001.safetensors")
    before = tree_hash(run_dir / "ck")
    proc = _deepy(world, run_dir, "train_iters=4")
    return proc, "optimizer/layer_001.safetensors: unreadable optimizer state file", [(run_dir / "ck", before)]


def case_deepy_resume_from_a_non_finite_moment(world, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = _copy_run(world, tmp_path)
    path = run_dir / "ck/global_step2/optimizer/layer_002.safetensors"
    tensors = load_file(str(path))
    tensors["mlp.up.weight.exp_avg_sq"].view(-1)[3] = float("inf")
    save_file(tensors, str(path))
    before = tree_hash(run_dir / "ck")
    proc = _deepy(world, run_dir, "train_iters=4")
    return proc, "optimizer/layer_002.safetensors: tensor mlp.up.weight.exp_avg_sq holds non-finite values (0 NaN, " \
        "1 Inf of", [(run_dir / "ck", before)]


def case_deepy_resume_without_the_optimizer_record(world, tmp_path):
    run_dir = _copy_run(world, tmp_path)
    (run_dir / "ck/global_step2/optimizer/state.json").write_text("{")
    before = tree_hash(run_dir / "ck")
    proc = _deepy(world, run_dir, "train_iters=4")
    return proc, "optimizer/state.json: unreadable optimizer record", [(run_dir / "ck", before)]


def case_deepy_resume_from_a_truncated_weight_file(world, tmp_path):
    run_dir = _copy_run(world, tmp_path)
    _truncate(run_dir / "ck/global_step2/weights/layer_001.safetensors")
    before = tree_hash(run_dir / "ck")
    return _deepy(world, run_dir, "train_iters=4"), "layer_001.safetensors: unreadable weight file", \
        [(run_dir / "ck", before)]


def case_deepy_unknown_key(world, tmp_path):
    bad = tmp_path / "typo.yml"
    bad.write_text("hiden_size: 64\n")
    proc = inprocess.deepy("train.py", "configs/llama3/tiny.yml", str(bad), cwd=ROOT)
    return proc, f"{bad}: unknown key 'hiden_size' (did you mean 'hidden_size'?)", []


def case_train_py_without_deepy(world, tmp_path):
    return _train_py("--config", world["w"] / "run/logs/config.yml"), "start training through deepy.py", []


def case_train_py_missing_config(world, tmp_path):
    return _train_py("--config", tmp_path / "no.yml", env={"RANK": "0", "WORLD_SIZE": "1"}), \
        "no.yml: config file not found", []


def case_preprocess_missing_input(world, tmp_path):
    return _tool("preprocess_data.py", "--input", tmp_path / "no.jsonl", "--output-prefix", tmp_path / "o",
                 "--tokenizer-type", "SPMTokenizer", "--vocab-file", world["tok"]), "no.jsonl: input file not found", []


def case_preprocess_absent_key(world, tmp_path):
    return _tool("preprocess_data.py", "--input", world["w"] / "corpus.jsonl", "--output-prefix", tmp_path / "o",
                 "--tokenizer-type", "SPMTokenizer", "--vocab-file", world["tok"], "--jsonl-keys", "content"), \
        "no usable document", []


def case_preprocess_bad_tokenizer_file(world, tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    return _tool("preprocess_data.py", "--input", world["w"] / "corpus.jsonl", "--output-prefix", tmp_path / "o",
                 "--tokenizer-type", "SPMTokenizer", "--vocab-file", tmp_path / "junk.model"), "junk.model", []


def case_train_tokenizer_missing_input(world, tmp_path):
    return _tool("train_tokenizer.py", "--input", tmp_path / "no.txt", "--output-prefix", tmp_path / "t"), \
        "input not found", []


def case_convert_to_hf_not_a_checkpoint(world, tmp_path):
    # a real process: the tool's script path itself
    return _process("convert_to_hf.py", "--checkpoint", tmp_path, "--output", tmp_path / "hf"), "not a checkpoint", []


def case_convert_to_hf_truncated_weights(world, tmp_path):
    run_dir = _copy_run(world, tmp_path)
    _truncate(run_dir / "ck/global_step2/weights/layer_002.safetensors")
    return _tool("convert_to_hf.py", "--checkpoint", run_dir / "ck", "--output", tmp_path / "hf"), \
        "layer_002.safetensors: unreadable weight file", []


def case_convert_to_hf_existing_output(world, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    return _tool("convert_to_hf.py", "--checkpoint", world["w"] / "run/ck", "--output", out), \
        "exists and is not empty", [(out, tree_hash(out))]


def case_convert_from_hf_no_config(world, tmp_path):
    return _tool("convert_from_hf.py", "--hf", tmp_path, "--output", tmp_path / "o"), "no config.json", []


def case_convert_from_hf_truncated_safetensors(world, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(world["w"] / "hf", hf)
    _truncate(hf / "model.safetensors")
    return _tool("convert_from_hf.py", "--hf", hf, "--output", tmp_path / "o"), \
        "model.safetensors: unreadable weight file", []


def case_generate_missing_checkpoint(world, tmp_path):
    return _tool("generate.py", "--checkpoint", tmp_path / "none", "--prompt", "x"), "checkpoint directory not found", []


def case_generate_truncated_weights(world, tmp_path):
    run_dir = _copy_run(world, tmp_path)
    _truncate(run_dir / "ck/global_step2/weights/layer_003.safetensors")
    return _tool("generate.py", "--checkpoint", run_dir / "ck", "--prompt", "x"), \
        "layer_003.safetensors: unreadable weight file", []


def case_generate_prompt_longer_than_the_context(world, tmp_path):
    return _tool("generate.py", "--checkpoint", world["w"] / "run/ck", "--prompt", "word " * 400), \
        "the model's context is 256", []


def _sft(world, tmp_path, records: str, *overrides: str):
    path = tmp_path / "sft.jsonl"
    path.write_text(records)
    args = ["train.py", "configs/llama3/tiny.yml", "tokenizer_type=SPMTokenizer",
            f"vocab_file={world['tok']}", "finetune=true", f"load={world['w'] / 'run/ck'}", f"sft_data_path={path}",
            f"save={tmp_path / 'ft'}", f"log_dir={tmp_path / 'ft/logs'}", "precision=fp32", "num_workers=0",
            "train_iters=2", "seq_length=32", "lora_r=4", "peak_tflops=1", *overrides]
    return inprocess.deepy(*args, cwd=ROOT), path


def case_finetune_record_with_an_unknown_role(world, tmp_path):
    proc, path = _sft(world, tmp_path, '{"instruction": "a", "output": "b"}\n'
                                       '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n')
    return proc, f"{path}: record 1: messages[1].role 'bot' is unknown", []


def case_finetune_bad_freeze_pattern(world, tmp_path):
    proc, _ = _sft(world, tmp_path, '{"instruction": "a", "output": "b"}\n', "lora_r=0", "freeze=[layers.9]")
    return proc, "freeze entry 'layers.9': blocks 9-9 are not within the model's blocks 0-1", []


def case_finetune_lora_without_a_base(world, tmp_path):
    proc, _ = _sft(world, tmp_path, '{"instruction": "a", "output": "b"}\n', "load=null", "finetune=false")
    return proc, "lora_r 4 adapts a trained base: set load", []


def case_merge_lora_of_a_full_checkpoint(world, tmp_path):
    return _tool("merge_lora.py", "--checkpoint", world["w"] / "run/ck", "--output", tmp_path / "m"), \
        "not an adapter checkpoint", []


def case_generate_adapter_that_is_not_lora(world, tmp_path):
    return _tool("generate.py", "--checkpoint", world["w"] / "run/ck", "--adapter", world["w"] / "run/ck", "--prompt",
                 "x"), "not an adapter checkpoint", []


CASES = {name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}
CASES.update(bad_cases.collect())  # the cases of tests/helpers/bad_cases/*.py (one module per kind of input)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a dataset made with it, a dataset with ids beyond it, a trained checkpoint and its HF export."""
    return make_world(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_and_changes_nothing(world, tmp_path, case):
    shared = [world["w"] / "run", world["w"] / "hf", world["w"] / "data_text_document.bin"]
    before = tree_hash(*shared[:2])
    proc, culprit, protected = CASES[case](world, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, None), out[-3000:]
    assert culprit in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert tree_hash(*shared[:2]) == before  # the shared checkpoint, export and data are untouched
    for path, digest in protected:
        assert tree_hash(path) == digest, f"{path} changed"
