"""Export to Hugging Face: transformers loads it offline, logits and tokenizer ids equal ours, bad inputs fail clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers  # a pinned requirement: fail, never skip, without it
from helpers import inprocess
from helpers.assets import asset
from helpers.data import make_docs
from helpers.launches import Case, completed, register
from helpers.runner import ROOT
from helpers.tokenizers import TEXTS
from helpers.training import deepy_args

from neox_llama.checkpoint.run import load_model
from neox_llama.convert.hf_tokenizer_export import write_tokenizer_files
from neox_llama.data.preprocess import preprocess
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.train import train_sentencepiece

pytestmark = pytest.mark.dist
uses_trained = pytest.mark.uses_cases("hf-export-trained")  # the tests that read the `trained` fixture


def trained_args(work):
    """The inputs, written into ``work`` (the case's folder), and deepy.py's arguments of the run into work/run."""
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(400)))
    (work / "corpus.txt").write_text("\n".join(make_docs(400)) + "\nunicode é 東京 digits 0123456789\n")
    model = train_sentencepiece([work / "corpus.txt"], work / "tok", 320)
    preprocess([work / "corpus.jsonl"], str(work / "data"), "SPMTokenizer", str(model), append_eod=True, progress=False)
    return deepy_args(work / "run", work / "data_text_document", "tokenizer_type=SPMTokenizer", f"vocab_file={model}",
                      "vocab_size=null", "pipe_parallel_size=2", "train_iters=3", "checkpoint_factor=3")


register(Case("hf-export-trained", 2, "train", trained_args))  # a case of the shared 2-rank launch


@pytest.fixture(scope="module")
def trained(launched):
    """A tiny model trained 3 steps as a 2-stage pipeline, with its own sentencepiece tokenizer."""
    proc = completed(launched("hf-export-trained"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return launched("hf-export-trained").folder


def export(checkpoint, output, *extra):
    """``python tools/convert_to_hf.py --checkpoint CHECKPOINT --output OUTPUT EXTRA``, run in this process."""
    return inprocess.tool("convert_to_hf.py", "--checkpoint", str(checkpoint), "--output", str(output), *extra)


def ours_from(checkpoint):
    model, ck = load_model(checkpoint)
    return ck, model


@uses_trained
def test_export_loads_in_transformers_with_equal_logits_and_ids(trained, tmp_path):
    proc = export(trained / "run" / "ck", tmp_path / "hf", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ck, ours = ours_from(trained / "run" / "ck")
    assert ck.true_vocab == 320 and ck.args.vocab_size == 320 + (64 - 320 % 64) % 64
    assert hf.config.vocab_size == 320 and hf.config.num_key_value_heads == 2
    assert hf.config.rope_parameters["rope_theta"] == 500000.0 and hf.config.tie_word_embeddings is False
    ids = torch.tensor([ck.tokenizer.encode("the quick brown fox jumps over the lazy dog 12")])
    with torch.no_grad():
        assert (ours(ids)[..., :320] - hf(ids).logits).abs().max().item() <= 1e-5
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == ck.tokenizer.encode(text, allow_special=True), text
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)
    # Streamed into shards of at most 40 kB (a larger tensor gets its own): the same tensors, an index naming each.
    proc = export(trained / "run" / "ck", tmp_path / "sharded", "--dtype", "fp32", "--max-shard-size", "40kB")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    sharded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    single = hf.state_dict()
    assert sharded.state_dict().keys() == single.keys()
    assert all(torch.equal(t, single[k]) for k, t in sharded.state_dict().items())
    assert export(trained / "run" / "ck", tmp_path / "bad", "--max-shard-size", "5 parsecs").stderr.strip() == \
        "convert_to_hf.py: error: --max-shard-size '5 parsecs': not a size (e.g. 5GB, 500MB or a number of bytes)"


@pytest.mark.parametrize("kind", ["spm-32k", "llama3-tokenizer"])
def test_exported_tokenizers_match_ours_on_real_files(tmp_path, kind):
    tokenizer = build_tokenizer("SPMTokenizer" if kind == "spm-32k" else "Llama3Tokenizer", asset(kind))
    write_tokenizer_files(tokenizer, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False).input_ids == tokenizer.encode(text, allow_special=True), text
        assert hf.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))


@uses_trained
def test_existing_output_is_refused_unless_forced(trained, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = export(trained / "run" / "ck", out)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr and (out / "keep.txt").exists()
    assert export(trained / "run" / "ck", out, "--force").returncode == 0 and (out / "config.json").exists()


@uses_trained
def test_bad_checkpoints_fail_clearly_and_write_nothing(trained, tmp_path):
    proc = export(tmp_path, tmp_path / "out1")
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(trained / "run" / "ck" / "global_step3", broken)
    (broken / "weights" / "layer_001.safetensors").unlink()
    proc = export(broken, tmp_path / "out2")
    assert proc.returncode == 2 and "layer_001.safetensors: missing (the checkpoint has no weights for layer 1)" in proc.stderr
    wrong = tmp_path / "wrong"
    shutil.copytree(trained / "run" / "ck" / "global_step3", wrong)
    text = (wrong / "config.yml").read_text()
    (wrong / "config.yml").write_text(text.replace("intermediate_size: 192", "intermediate_size: 256"))
    proc = export(wrong, tmp_path / "out3")
    assert proc.returncode == 2 and "1.mlp.gate.weight has shape (192, 64), but its config.yml implies (256, 64)" in proc.stderr
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


@uses_trained
def test_greedy_generation_equals_transformers_and_the_cache_equals_recomputing(trained, tmp_path):
    from benchmarks.reference_generator import Generator
    from neox_llama.generation.settings import GenerationSettings

    assert export(trained / "run" / "ck", tmp_path / "hf", "--dtype", "fp32").returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    gen = Generator.from_checkpoint(str(trained / "run" / "ck"), device="cpu")
    prompt = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("the quick brown fox").input_ids
    assert prompt == gen.tokenizer.encode_document("the quick brown fox") and prompt[0] == 1  # BOS, as trained
    settings = GenerationSettings(max_new_tokens=32, stop_ids={-1})  # no early stop: compare all 32 tokens
    ours = gen.generate_ids(prompt, settings)
    assert ours == gen.generate_ids(prompt, settings, use_cache=False)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == ours and len(ours) == 32
    sampled = GenerationSettings(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=5, stop_ids={-1})
    assert gen.generate_ids(prompt, sampled) == gen.generate_ids(prompt, sampled, use_cache=False)
    top1 = GenerationSettings(max_new_tokens=16, temperature=1.0, top_k=1, seed=3, stop_ids={-1})
    assert gen.generate_ids(prompt, top1) == ours[:16]


def _hf_greedy_text(hf_dir, text: str, new_tokens: int) -> str:
    """What a transformers user gets: AutoTokenizer(text) (no manual BOS), greedy generate, and the text the new
    tokens add (the whole sequence decoded, less the prompt: a leading space of the answer is kept)."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    stops = set(model.generation_config.eos_token_id or [])
    if isinstance(model.generation_config.eos_token_id, int):
        stops = {model.generation_config.eos_token_id}
    kept = []
    for token in out:
        if token in stops:
            break
        kept.append(token)
    whole = tok.decode(ids[0].tolist() + kept, skip_special_tokens=True)
    assert whole.startswith(text)
    return whole[len(text):]


@uses_trained
@pytest.mark.parametrize("kind", ["spm-trained", "llama3-random"])
def test_generate_py_equals_greedy_transformers_on_the_export_without_manual_bos(trained, tmp_path, kind):
    if kind == "spm-trained":
        checkpoint = trained / "run" / "ck"
    else:
        from helpers.checkpoints import TINY, save_random_checkpoint

        checkpoint = tmp_path / "l3" / "global_step1"
        save_random_checkpoint(checkpoint, {**TINY, "max_position_embeddings": 64}, tokenizer_type="Llama3Tokenizer",
                               tokenizer_file=asset("llama3-tokenizer"))
    assert export(checkpoint, tmp_path / "hf", "--dtype", "fp32").returncode == 0
    text = "the quick brown fox"
    proc = inprocess.tool("generate.py", "--checkpoint", str(checkpoint), "--prompt", text, "--max-new-tokens", "12",
                          "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == text + _hf_greedy_text(tmp_path / "hf", text, 12) + "\n"


@uses_trained
def test_generate_cli_streams_a_continuation(trained):
    # a real process: the tool's script path itself
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(trained / "run" / "ck"),
                           "--prompt", "the quick", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the quick") and len(proc.stdout.strip()) > len("the quick")
    bad = inprocess.tool("generate.py", "--checkpoint", "/nonexistent", "--prompt", "x")
    assert bad.returncode == 2 and "/nonexistent: checkpoint directory not found" in bad.stderr
