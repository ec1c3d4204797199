"""Fine-tuning through deepy.py on real ranks: LoRA on JSON records with self-describing checkpoints at every
step, merging an intermediate step, --adapter generation and chat, exact resume, and a full fine-tune with
frozen layers from a Hugging Face import."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from helpers import inprocess
from helpers.assets import asset
from helpers.finetune import LORA, deepy, deepy_args, metrics, ok, records, shared_setup
from helpers.launches import Case, completed, register
from helpers.lora import IDS, unmerged_logits
from helpers.runner import ROOT, free_port

from neox_llama.checkpoint.merge import Adapter
from neox_llama.checkpoint.metadata import read_metadata
from neox_llama.checkpoint.run import load_model
from neox_llama.checkpoint.weights import read_layer_file
from neox_llama.tokenizers.train import train_sentencepiece

pytestmark = pytest.mark.dist

@pytest.fixture(scope="module")
def setup(finetune_setup, tmp_path_factory):
    """This module's work folder, and the session's records, tokenizer and base checkpoint (conftest)."""
    _, data, tokenizer, base = finetune_setup
    return tmp_path_factory.mktemp("ft"), data, tokenizer, base


def tool(name, *args, stdin=None):
    """``python tools/NAME ARGS`` from the repository root, run in this process."""
    return inprocess.tool(name, *args, stdin=stdin, cwd=ROOT)


LORA_RUN = [*LORA, "train_iters=6", "checkpoint_factor=2", "eval_interval=2", "save_best=true"]
LAYOUTS = {"pp2": ["pipe_parallel_size=2"], "tp2": ["model_parallel_size=2"],
           "zero3-dp2": ["num_gpus=2", "train_micro_batch_size_per_gpu=1", "zero_optimization.stage=3",
                         "zero_optimization.stage3_param_persistence_threshold=0"]}


def lora_args(save, *layout):
    """deepy.py's arguments of the LoRA run on the session's base (:func:`helpers.finetune.shared_setup`)."""
    _, data, tokenizer, base = shared_setup()
    return deepy_args(save, tokenizer, "finetune=true", f"load={base}", f"sft_data_path={data}", *LORA_RUN, *layout)


for _name, _layout in LAYOUTS.items():  # the LoRA run at other layouts: cases of the shared 2-rank launch
    register(Case(f"finetune-lora-{_name}", 2, "train", lambda folder, layout=_layout: lora_args(folder / "run", *layout)))


@pytest.fixture(scope="module")
def lora_run(setup):
    tmp, data, tokenizer, base = setup
    save = tmp / "lora"
    proc = ok(deepy(save, tokenizer, "finetune=true", f"load={base}", f"sft_data_path={data}", *LORA_RUN))
    return save, proc


def test_every_lora_step_is_a_self_describing_adapter_checkpoint(setup, lora_run):
    base = setup[3]
    save, proc = lora_run
    assert "fine-tuning from LoRA r 8 on the frozen weights of" in proc.stderr
    assert "32 training and 8 validation records, prompt style alpaca" in proc.stderr
    for tag in ("global_step2", "global_step4", "global_step6", "best"):
        folder = save / tag
        assert (folder / "adapter").is_dir() and not (folder / "weights").exists(), tag
        meta = read_metadata(folder)
        assert meta.lora == {"r": 8, "alpha": 4.0, "dropout": 0.0, "targets": ["query", "value", "mlp"]}
        assert meta.prompt_style == "alpaca" and meta.base.path == str(base.resolve())
        names = {n for f in (folder / "adapter").iterdir() for n in read_layer_file(f)}
        assert names == {f"{p}.lora.{x}" for p in ("attention.query", "attention.value", "mlp.gate", "mlp.up", "mlp.down")
                         for x in "ab"}
    moments = {n for f in (save / "global_step2" / "optimizer").glob("layer_*.safetensors") for n in read_layer_file(f)}
    assert moments == {f"{n}.{k}" for n in names for k in ("exp_avg", "exp_avg_sq")}  # the adapters', not the base's
    assert not list((save / "global_step2").glob("*.pt"))  # no DeepSpeed engine files
    valid = metrics(save, "valid_loss")
    assert [r["step"] for r in valid] == [2, 4, 6] and valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert all(0 < r["valid_bpb"] < r["valid_loss"] for r in valid)  # bits per byte of the scored responses
    assert [r["epoch"] for r in metrics(save)] == [1] * 6  # 32 records, 2 per step: one epoch is 16 steps


def test_an_intermediate_step_merges_and_generates_like_base_plus_adapter(setup, lora_run):
    tmp, _, _, base = setup
    save, _ = lora_run
    step4 = save / "global_step4"
    proc = tool("merge_lora.py", "--checkpoint", str(step4), "--output", str(tmp / "merged4"))
    assert proc.returncode == 0, proc.stderr
    settings = Adapter.open(step4).settings
    expected = unmerged_logits(base, step4, settings)
    with torch.no_grad():
        merged = load_model(tmp / "merged4")[0](IDS)
    assert (merged - expected).abs().max().item() <= 1e-5
    assert (merged - load_model(base)[0](IDS)).abs().max().item() > 1e-4  # step 4 is not the base
    prompt = ["--prompt", "Repeat the words: apple river stone", "--max-new-tokens", "12", "--prompt-style", "alpaca"]
    with_adapter = tool("generate.py", "--checkpoint", str(base), "--adapter", str(step4), *prompt)
    alone = tool("generate.py", "--checkpoint", str(step4), *prompt)  # the base found through the metadata
    from_merged = tool("generate.py", "--checkpoint", str(tmp / "merged4"), *prompt)
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert with_adapter.stdout == alone.stdout == from_merged.stdout and with_adapter.stdout.strip()
    chat = tool("generate.py", "--checkpoint", str(step4), "--chat", "--max-new-tokens", "4",
                stdin="Repeat the words: apple\nAnd again\n/reset\nOnce more\n/exit\nnever read\n")
    assert chat.returncode == 0, chat.stderr
    assert [line for line in chat.stdout.splitlines() if line.startswith(">>> ")] == \
        [">>> Repeat the words: apple", ">>> And again", ">>> Once more"]
    assert "(history cleared)" in chat.stdout and "never read" not in chat.stdout


def test_lora_kill_and_rerun_resumes_exactly(setup):
    tmp, data, tokenizer, base = setup
    common = ["finetune=true", f"load={base}", f"sft_data_path={data}", *LORA, "train_iters=8", "checkpoint_factor=2",
              "eval_interval=100"]
    straight = tmp / "straight"
    ok(deepy(straight, tokenizer, *common))
    broken = tmp / "broken"
    proc = deepy(broken, tokenizer, *common, wait=False)
    latest = broken / "latest"
    while not latest.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().removeprefix("global_step"))
    assert killed_at < 8
    resumed = ok(deepy(broken, tokenizer, *common))  # the same command: save holds a checkpoint of this fine-tune
    assert f"holds global_step{killed_at} of this fine-tune" in resumed.stderr
    assert f"resumed from {broken / f'global_step{killed_at}'} at step {killed_at}" in resumed.stderr
    assert [r["step"] for r in metrics(broken)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(broken)] == [r["loss"] for r in metrics(straight)]  # exactly equal
    # load: a LoRA checkpoint with finetune false resumes it; the base comes from its metadata
    cont = ok(deepy(tmp / "cont", tokenizer, "finetune=false", f"load={straight / 'global_step6'}",
                    f"sft_data_path={data}", *LORA, "train_iters=8", "checkpoint_factor=2", "eval_interval=100"))
    assert "at step 6" in cont.stderr
    assert [r["loss"] for r in metrics(tmp / "cont")] == [r["loss"] for r in metrics(straight)][6:]
    # a fine-tune of another base never overwrites the checkpoints already in save
    shutil.copytree(base, tmp / "base2")
    (tmp / "base2" / "metadata.json").write_text((base / "metadata.json").read_text().replace('"step": 7', '"step": 8'))
    clash = deepy(straight, tokenizer, "finetune=true", f"load={tmp / 'base2'}", f"sft_data_path={data}", *LORA,
                  "train_iters=2")
    assert clash.returncode == 2 and "which is not a fine-tune of" in clash.stderr
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(broken)]


def test_bad_records_and_settings_stop_before_training(setup):
    tmp, data, tokenizer, base = setup
    bad = tmp / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in records(3)) + '\n{"instruction": "x", "output": 5}\n')
    proc = deepy(tmp / "bad", tokenizer, "finetune=true", f"load={base}", f"sft_data_path={bad}", *LORA, "train_iters=2")
    assert proc.returncode == 2 and f"{bad}: record 3: field 'output' is a int" in proc.stderr
    assert "Traceback" not in proc.stderr
    tied = deepy(tmp / "t", tokenizer, "finetune=true", f"load={base}", f"sft_data_path={data}", *LORA,
                 "lora_targets=[head]", "no_weight_tying=false", "train_iters=2")
    assert tied.returncode == 2 and "lora_targets head is refused while the head is tied" in tied.stderr
    resume_full = deepy(tmp / "r", tokenizer, f"load={base}", f"sft_data_path={data}", *LORA, "train_iters=2")
    assert resume_full.returncode == 2 and "set finetune: true to start LoRA from it" in resume_full.stderr


def test_full_finetune_with_frozen_layers_from_a_hugging_face_import(tmp_path):
    """The demo records on a tiny model imported from Hugging Face: validation loss falls; frozen tensors stay."""
    import transformers  # a pinned requirement: fail, never skip, without it
    alpaca = asset("alpaca")
    text = tmp_path / "text.jsonl"
    demo = json.loads(alpaca.read_text())
    text.write_text("\n".join(json.dumps({"text": f"{r['instruction']} {r['input']} {r['output']}"}) for r in demo))
    tokenizer = train_sentencepiece([text], tmp_path / "tok", 384)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    assert tool("convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")).returncode == 0
    save = tmp_path / "full"
    args = [str(tmp_path / "ours" / "model.yml"),
            "tokenizer_type=SPMTokenizer", f"vocab_file={tokenizer}", "make_vocab_size_divisible_by=1", "seq_length=96",
            "precision=fp32", "num_workers=0", "log_interval=5", "tensorboard_dir=null", f"save={save}",
            f"log_dir={save}/logs", f"master_port={free_port()}", "finetune=true", f"load={tmp_path / 'ours'}",
            f"sft_data_path={alpaca}", "val_split_fraction=0.05", "train_iters=40", "eval_interval=5", "eval_iters=4",
            "checkpoint_factor=40", "train_micro_batch_size_per_gpu=4", "optimizer.params.lr=3e-3", "warmup_iters=2",
            "freeze=[embeddings, layers.0]", "peak_tflops=1"]
    proc = ok(inprocess.deepy("train.py", *args, cwd=ROOT))
    assert "frozen: embeddings, layers.0" in proc.stderr
    valid = [r["valid_loss"] for r in metrics(save, "valid_loss")]
    assert valid[-1] < valid[0] - 0.3, valid
    for index in (0, 1, 2):
        before = read_layer_file(tmp_path / "ours" / "global_step0" / "weights" / f"layer_{index:03d}.safetensors")
        after = read_layer_file(save / "global_step40" / "weights" / f"layer_{index:03d}.safetensors")
        same = all(torch.equal(before[n], after[n]) for n in before)
        assert same == (index < 2), index  # embedding and block 0 frozen bit for bit; block 1 trained
    assert read_metadata(save / "global_step40").prompt_style == "alpaca"


@pytest.mark.parametrize("case", [f"finetune-lora-{name}" for name in LAYOUTS], ids=list(LAYOUTS))
def test_lora_runs_at_other_layouts_save_the_same_adapters(lora_run, launched, case):
    save, _ = lora_run
    other = launched(case).folder / "run"
    ok(completed(launched(case)))
    assert [r["loss"] for r in metrics(other)] == pytest.approx([r["loss"] for r in metrics(save)], abs=1e-5)
    for file in sorted((save / "global_step6" / "adapter").iterdir()):
        ours, theirs = read_layer_file(file), read_layer_file(other / "global_step6" / "adapter" / file.name)
        assert set(ours) == set(theirs)
        for name in ours:
            # six Adam steps at lr 1e-2 amplify fp32 reduction-order noise in tiny gradients: 1e-4 of ~6e-2 moved
            assert (ours[name] - theirs[name]).abs().max().item() <= 1e-4, (file.name, name)
