"""Coming from GPT-NeoX: its Llama-2 config files translate to ours exactly, with a report of every key.

The GPT-NeoX files in tests/data/gpt_neox/ are copied verbatim from EleutherAI/gpt-neox (configs/llama2/{7B,13B,70B}.yml
and configs/llama/train_config.yml at commit ea7aefd8; Apache-2.0), comments and trailing commas included; the
README and docs/from_gpt_neox.md translate them in their examples.
"""

from __future__ import annotations

import re
import sys

import pytest
from helpers import inprocess
from helpers.runner import ROOT, run

from neox_llama.config.loading import ConfigError, build_config, load_raw
from neox_llama.config.neox_translate import mlp_width

GPT_NEOX = ROOT / "tests/data/gpt_neox"
NEOX = {name: (GPT_NEOX / folder / name).read_text() for folder, name in
        [("llama2", "7B.yml"), ("llama2", "13B.yml"), ("llama2", "70B.yml"), ("llama", "train_config.yml")]}
"""GPT-NeoX's own files, as the docs' examples name them (tests/data/gpt_neox/)."""

OFFICIAL = {"7B.yml": 6_738_415_616, "13B.yml": 13_015_864_320, "70B.yml": 68_976_648_192}
"""Hugging Face parameter counts of meta-llama/Llama-2-{7b,13b,70b}-hf."""


def write(tmp_path, name, text=None):
    path = tmp_path / name
    path.write_text(NEOX[name] if text is None else text)
    return path


def convert(*args, cwd=None):
    """``python tools/convert_neox_config.py ARGS`` (from the repository root unless ``cwd``), run in this process."""
    return inprocess.tool("convert_neox_config.py", *map(str, args), cwd=cwd or ROOT)


def dry_run_parameters(config) -> int:
    proc = inprocess.deepy("train.py", str(config), "--dry-run", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(re.search(r"parameters: ([\d,]+) total", proc.stdout).group(1).replace(",", ""))


def test_gpt_neox_mlp_rule_gives_metas_widths():
    assert mlp_width(4096, "swiglu", 32768, None, 256) == 11008
    assert mlp_width(5120, "swiglu", 41472, None, 256) == 13824
    assert mlp_width(8192, "swiglu", 86016, None, 256) == 28672
    assert mlp_width(1024, "gelu", None, None, 1) == 4096
    with pytest.raises(ConfigError, match="do not fit together"):  # 1365 -> 1366 and 682: GPT-NeoX fails too
        mlp_width(1024, "swiglu", None, 2.0, 1)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_llama2_model_files_translate_to_the_official_parameter_counts(tmp_path, name):
    model = write(tmp_path, name)
    meta = write(tmp_path, "meta.yml", "{ use_bias_in_mlp: false }")  # Meta's Llama has no MLP biases
    proc = convert(model, meta, "--vocab-size", "32000", "--output", tmp_path / "ours.yml")
    assert proc.returncode == 0, proc.stderr
    assert dry_run_parameters(tmp_path / "ours.yml") == OFFICIAL[name]
    assert "same shape as the preset Llama-2-" in proc.stdout
    # Without it, GPT-NeoX's default (use_bias_in_mlp: true) gives every MLP projection a bias: said, and counted.
    proc = convert(model, "--vocab-size", "32000", "--output", tmp_path / "neox.yml")
    assert proc.returncode == 0 and "use_bias_in_mlp is not set, so GPT-NeoX gives every MLP projection a bias" in proc.stdout
    text = (tmp_path / "neox.yml").read_text()
    assert "use_bias_in_mlp: true  # GPT-NeoX default use_bias_in_mlp: True" in text
    layers = int(re.search(r"num_layers: (\d+)", text).group(1))
    hidden = int(re.search(r"hidden_size: (\d+)", text).group(1))
    width = int(re.search(r"intermediate_size: (\d+)", text).group(1))
    assert dry_run_parameters(tmp_path / "neox.yml") == OFFICIAL[name] + layers * (2 * width + hidden)


def test_every_line_says_where_it_came_from_and_our_loader_reads_it_back(tmp_path):
    # a real process: the tool's script path itself
    proc = run([sys.executable, str(ROOT / "tools" / "convert_neox_config.py"), str(write(tmp_path, "7B.yml")),
                "--vocab-size", "32000", "--output", str(tmp_path / "ours.yml")])
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in (tmp_path / "ours.yml").read_text().splitlines() if not x.startswith("#")]
    assert all("  # " in line for line in lines)
    assert "intermediate_size: 11008  # 7B.yml: intermediate_size, 7B.yml: mlp_multiple_of, 7B.yml: activation (GPT-NeoX's MLP rule)" in lines
    problems: list[str] = []
    build_config(*load_raw([tmp_path / "ours.yml"], apply_presets=False), problems=problems)
    assert problems == []  # no unknown key, no wrong type


def test_hyphenated_and_underscored_spellings_give_the_same_output(tmp_path):
    text = NEOX["7B.yml"]
    hyphens = re.sub(r'"([a-z_]+)":', lambda m: '"' + m.group(1).replace("_", "-") + '":', text)
    assert "num-layers" in hyphens
    convert(write(tmp_path, "7B.yml"), "--vocab-size", "32000", "--output", tmp_path / "a.yml")
    (tmp_path / "h").mkdir()
    proc = convert(write(tmp_path / "h", "7B.yml", hyphens), "--vocab-size", "32000", "--output", tmp_path / "b.yml")
    assert proc.returncode == 0, proc.stderr
    body = lambda p: re.sub(r"#.*", "", p.read_text()).replace("-", "_")  # noqa: E731  (comments name the spelling)
    assert body(tmp_path / "a.yml") == body(tmp_path / "b.yml")


def test_the_train_config_report_has_all_three_groups_and_stops_on_keys_without_an_equivalent(tmp_path):
    model, train = write(tmp_path, "70B.yml"), write(tmp_path, "train_config.yml")
    proc = convert(model, train, "--vocab-size", "32000", "--output", tmp_path / "ours.yml")
    assert proc.returncode == 2 and not (tmp_path / "ours.yml").exists()
    for group in ("translated (", "dropped: neox_llama chooses these itself (", "no equivalent ("):
        assert group in proc.stdout
    for line in ("train_config.yml: fp16 -> precision: 'fp16'", "train_config.yml: optimizer, train_config.yml: weight_decay "
                 "(GPT-NeoX's defaults for what they leave out) -> optimizer: {'type': 'AdamW'", "70B.yml: bias_gelu_fusion: no fused kernels",
                 "train_config.yml: partition_activations: no equivalent", "train_config.yml: init_method: "
                 "initialisation small_init has no equivalent"):
        assert line in proc.stdout, line
    assert "rotary_emb_base: 1000000.0 here, 10000.0 in Llama-2-70b-hf" in proc.stdout  # GPT-NeoX's 70B differs
    assert "pass --drop-unsupported" in proc.stderr and "nothing was written" in proc.stderr
    proc = convert(model, train, "--vocab-size", "32000", "--output", tmp_path / "ours.yml", "--drop-unsupported")
    assert proc.returncode == 0 and "dropped 3 key(s) without an equivalent" in proc.stdout, proc.stderr


def test_an_unknown_key_and_a_key_set_twice_are_refused(tmp_path):
    odd = write(tmp_path, "odd.yml", '{ "num_layers": 2, "not_a_key_anywhere": 1 }')
    proc = convert(odd, "--output", tmp_path / "o.yml")
    assert proc.returncode == 2 and "odd.yml: not_a_key_anywhere: unknown key" in proc.stdout
    again = write(tmp_path, "again.yml", '{ "num-layers": 3 }')
    proc = convert(odd, again, "--output", tmp_path / "o.yml")
    assert proc.returncode == 2 and "again.yml: num-layers is also set in odd.yml: num_layers" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.yml").exists()


def test_deepy_recognises_a_gpt_neox_file_and_names_the_command(tmp_path):
    proc = inprocess.deepy("train.py", str(write(tmp_path, "7B.yml")), "--dry-run", cwd=ROOT)
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert "this looks like a GPT-NeoX config" in first and "python tools/convert_neox_config.py" in first
