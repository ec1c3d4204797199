"""Merging YAML files and overrides: order, provenance, number spelling, and every loading error."""

from __future__ import annotations

import logging

import pytest

from neox_llama.config import ConfigError, dump_raw, load_config
from neox_llama.config.loading import build_config, load_raw

TINY = """
num_layers: 2
hidden_size: 64
num_attention_heads: 4
num_kv_heads: 2
intermediate_size: 192
seq_length: 32
vocab_size: 500
"""


def errors_of(excinfo: pytest.ExceptionInfo) -> list[str]:
    return excinfo.value.problems


def test_later_file_overrides_earlier_and_logs_both_files(write_yaml, caplog):
    a = write_yaml("a.yml", TINY + "seed: 1\n")
    b = write_yaml("b.yml", "hidden_size: 128\n")
    with caplog.at_level(logging.INFO, logger="neox_llama.config.loading"):
        cfg = load_config([a, b])
    assert cfg.hidden_size == 128 and cfg.seed == 1
    assert cfg.sources["hidden_size"] == str(b) and cfg.sources["seed"] == str(a)
    assert f"hidden_size: 64 ({a}) -> 128 ({b})" in caplog.text
    assert "seed" not in caplog.text  # only changed values are logged


def test_dotted_override_reaches_inside_nested_keys_and_keeps_siblings(write_yaml, caplog):
    a = write_yaml("a.yml", TINY + "optimizer:\n  type: Adam\n  params: {lr: 3.0e-4, eps: 1.0e-6}\n")
    with caplog.at_level(logging.INFO, logger="neox_llama.config.loading"):
        cfg = load_config([a], ["optimizer.params.lr=1e-4", "train_iters=5e3"])
    assert cfg.optimizer.params.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.params.lr, float)
    assert cfg.optimizer.params.eps == pytest.approx(1e-6)
    assert cfg.optimizer.type == "Adam"
    assert cfg.train_iters == 5000 and isinstance(cfg.train_iters, int)
    assert cfg.sources["optimizer.params.lr"] == "command line"
    assert cfg.sources["optimizer.params.eps"] == str(a)
    assert f"optimizer.params.lr: 0.0003 ({a}) -> 0.0001 (command line)" in caplog.text


def test_numbers_without_a_dot_are_floats(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY + "min_lr: 1e-5\nrms_norm_epsilon: 1e-6\nlr_decay_iters: 5e5\n")])
    assert cfg.min_lr == pytest.approx(1e-5) and cfg.rms_norm_epsilon == pytest.approx(1e-6)
    assert cfg.lr_decay_iters == 500_000


def test_override_values_are_read_as_yaml(write_yaml):
    cfg = load_config([write_yaml("a.yml", TINY)],
                      ["finetune=false", "train_data_weights=[1, 2.5]", "train_data_paths=[a, b]"])
    assert cfg.finetune is False
    assert cfg.train_data_weights == [1.0, 2.5]
    assert cfg.train_data_paths == ["a", "b"]


def test_unknown_key_names_file_and_close_match(write_yaml):
    bad = write_yaml("typo.yml", "hiden_size: 64\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY), bad])
    (line,) = errors_of(excinfo)
    assert line.startswith(f"{bad}:") and "'hiden_size'" in line and "did you mean 'hidden_size'" in line


def test_unknown_nested_key_names_the_dotted_key(write_yaml):
    bad = write_yaml("b.yml", "zero_optimization: {stag: 2}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY), bad])
    (line,) = errors_of(excinfo)
    assert str(bad) in line and "zero_optimization.stag" in line and "zero_optimization.stage" in line


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("num_layers: two\n", "num_layers", "expected int"),
    ("num_layers: 2.5\n", "num_layers", "expected int"),
    ("use_wandb: 1\n", "use_wandb", "expected bool"),
    ("rotary_emb_base: fast\n", "rotary_emb_base", "expected float"),
    ("precision: bf61\n", "precision", "one of bf16, fp16, fp32"),
    ("lora_targets: query\n", "lora_targets", "expected a list"),
    ("lora_targets: [query, kee]\n", "lora_targets[1]", "did you mean 'key'"),
    ("rope_scaling: 8\n", "rope_scaling", "expected a mapping"),
    ("vocab_file: 12\n", "vocab_file", "expected str"),
])
def test_wrong_type_names_key_value_and_expected_type(write_yaml, text, key, expected):
    bad = write_yaml("bad.yml", text)
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY), bad])
    (line,) = errors_of(excinfo)
    assert line.startswith(f"{bad}: {key}:"), line
    assert expected in line
    value = text.split(":", 1)[1].strip().strip("[]").split(",")[-1].strip()
    assert line.rstrip().endswith(")") and ("got " + value in line or f"got '{value}'" in line)  # the value is shown


@pytest.mark.parametrize(("text", "message"), [
    ("num_layers: 0\n", "num_layers: 0 must be >= 1"),
    ("hidden_dropout: 1.5\n", "hidden_dropout: 1.5 must be <= 1"),
    ("zero_optimization: {stage: 4}\n", "zero_optimization.stage: 4 must be <= 3"),
])
def test_out_of_range_values_are_rejected(write_yaml, text, message):
    bad = write_yaml("bad.yml", text)
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY), bad])
    assert errors_of(excinfo) == [f"{bad}: {message}"]


def test_all_problems_are_reported_together(write_yaml):
    a = write_yaml("a.yml", TINY + "hiden_size: 1\n")
    b = write_yaml("b.yml", "num_layers: x\nprecision: fp8\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config([a, b], ["seqlen=4"])
    lines = errors_of(excinfo)
    assert len(lines) == 4
    assert any(str(a) in x and "hiden_size" in x for x in lines)
    assert any(str(b) in x and "num_layers" in x for x in lines)
    assert any(str(b) in x and "precision" in x for x in lines)
    assert any(x.startswith("command line:") and "seqlen" in x and "seq_length" in x for x in lines)


def test_yaml_syntax_error_names_file_and_line(write_yaml):
    bad = write_yaml("broken.yml", "num_layers: 2\nhidden_size: 64\n  oops: [\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config([bad])
    (line,) = errors_of(excinfo)
    assert line.startswith(f"{bad}:3:") and "YAML error" in line


def test_a_key_written_twice_in_one_file_is_an_error(write_yaml):
    bad = write_yaml("dup.yml", "num_layers: 2\nhidden_size: 64\nnum_layers: 4\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config([bad])
    (line,) = errors_of(excinfo)
    assert line.startswith(f"{bad}:3:") and "'num_layers' appears twice (first on line 1)" in line


def test_top_level_must_be_a_mapping(write_yaml):
    bad = write_yaml("list.yml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([bad])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config([tmp_path / "nope.yml"], ["=3", "a..b=1"])
    lines = errors_of(excinfo)
    assert lines[0] == f"{tmp_path / 'nope.yml'}: config file not found"
    assert any("'=3' is neither" in x for x in lines) and any("'a..b=1' is neither" in x for x in lines)


def test_dumped_merged_config_reloads_to_the_same_config(write_yaml, tmp_path):
    a = write_yaml("a.yml", TINY + "optimizer: {params: {lr: 1e-3}}\nrope_scaling: {factor: 4.0}\n")
    raw, sources = load_raw([a], ["train_data_paths=[x, y]", "min_lr=1e-5"])
    cfg = build_config(raw, sources)
    out = dump_raw(raw, tmp_path / "run" / "config.yml", header="# test")
    again = load_config([out], apply_presets=False)
    for name in ("optimizer", "rope_scaling", "train_data_paths", "min_lr", "hidden_size", "num_kv_heads"):
        assert getattr(again, name) == getattr(cfg, name), name
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed away


def test_yaml_merge_key_inside_a_mapping(write_yaml):
    text = TINY + "zero_optimization:\n  <<: {stage: 2, overlap_comm: true}\n  contiguous_gradients: false\n"
    cfg = load_config([write_yaml("a.yml", text)])
    z = cfg.zero_optimization
    assert (z.stage, z.overlap_comm, z.contiguous_gradients) == (2, True, False)


def test_non_finite_numbers_and_quoted_numbers_are_rejected(write_yaml):
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("a.yml", TINY + "gradient_clipping: .inf\nmin_lr: .nan\nseed: '3'\n")])
    text = "\n".join(excinfo.value.problems)
    assert "gradient_clipping: expected a finite float" in text and "min_lr: expected a finite float" in text
    assert "seed: expected int, got '3' (str)" in text


def test_text_overrides_are_taken_literally_and_round_trip(write_yaml, tmp_path):
    a = write_yaml("a.yml", TINY)
    raw, sources = load_raw([a], ["wandb_group=run #2", "data_path=a: b", "split=98,2,0", "wandb_project=1e5"])
    cfg = build_config(raw, sources)
    assert (cfg.wandb_group, cfg.data_path, cfg.split, cfg.wandb_project) == ("run #2", "a: b", "98,2,0", "1e5")
    again = load_config([dump_raw(raw, tmp_path / "c.yml")], apply_presets=False)
    assert (again.wandb_group, again.data_path, again.wandb_project) == ("run #2", "a: b", "1e5")


def test_nested_source_names_the_last_file_that_touched_it(write_yaml):
    a = write_yaml("a.yml", TINY + "rope_scaling: {factor: 8.0}\n")
    b = write_yaml("b.yml", "rope_scaling: {low_freq_factor: 2.0}\npos_emb: learned\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config([a, b])
    assert excinfo.value.problems[0].startswith(f"{b}: rope_scaling needs pos_emb rotary")
