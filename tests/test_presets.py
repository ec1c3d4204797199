"""Model presets: official numbers, selection by model_name, and the errors around it."""

from __future__ import annotations

import pytest
import yaml
from helpers.presets import OFFICIAL_TOTALS

from neox_llama.config import ConfigError, load_config
from neox_llama.config.presets import ALIASES, CONFIG_DIR, PRESETS
from neox_llama.planning.flops import count_parameters


@pytest.mark.parametrize("name", list(OFFICIAL_TOTALS))
def test_preset_parameter_count_equals_the_official_total(name):
    cfg = load_config([CONFIG_DIR / PRESETS[name]])
    assert count_parameters(cfg).total == OFFICIAL_TOTALS[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_file_names_itself_and_validates(name):
    path = CONFIG_DIR / PRESETS[name]
    assert yaml.safe_load(path.read_text())["model_name"] == name
    cfg = load_config([path], ["vocab_size=512"])
    assert cfg.model_name == name


def test_rope_scaling_presets_carry_the_llama31_dict():
    cfg = load_config([CONFIG_DIR / "llama3.2/1B.yml"])
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 32.0
    assert cfg.rope_scaling.original_max_position_embeddings == 8192 and cfg.no_weight_tying is False


def test_model_name_selects_the_preset_underneath_the_listed_files(write_yaml):
    local = write_yaml("local.yml", "model_name: Meta-Llama-3-8B\nseq_length: 2048\n")
    cfg = load_config([local])
    assert cfg.hidden_size == 4096 and cfg.num_kv_heads == 8 and cfg.rotary_emb_base == 500000.0
    assert cfg.seq_length == 2048  # the user's file wins over the preset
    assert cfg.sources["hidden_size"].startswith("configs/llama3/8B.yml") or "llama3/8B.yml" in cfg.sources["hidden_size"]
    assert cfg.sources["seq_length"] == str(local)


def test_model_name_from_the_command_line_and_aliases(write_yaml):
    local = write_yaml("local.yml", "seed: 3\n")
    assert load_config([local], ["model_name=meta-llama/Llama-2-7b-chat-hf"]).num_layers == 32
    assert set(ALIASES.values()) <= set(PRESETS)


def test_unknown_model_name_lists_the_known_ones(write_yaml):
    with pytest.raises(ConfigError) as excinfo:
        load_config([write_yaml("local.yml", "model_name: Llama-4-1T\n")])
    (line,) = excinfo.value.problems
    assert "model_name 'Llama-4-1T' is not a known model" in line
    for name in PRESETS:
        assert name in line


def test_model_name_contradicting_a_listed_preset_is_an_error():
    with pytest.raises(ConfigError, match="list one or the other"):
        load_config([CONFIG_DIR / "llama2/7B.yml"], ["model_name=Meta-Llama-3-8B"])


@pytest.mark.parametrize("name", ["llama3/tiny", "llama3/tiny.yml", "configs/llama3/tiny.yml", "tiny-llama3"])
def test_a_config_that_is_no_file_here_is_read_from_the_shipped_configs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([name, "local"], ["vocab_size=512"])
    assert cfg.num_layers == 2 and cfg.data_path == "data/shakespeare_text_document"
    assert cfg.sources["num_layers"] == str(CONFIG_DIR / "llama3/tiny.yml")
    (tmp_path / "configs/llama3").mkdir(parents=True)
    shipped = (CONFIG_DIR / "llama3/tiny.yml").read_text()
    (tmp_path / "configs/llama3/tiny.yml").write_text(shipped.replace("num_layers: 2", "num_layers: 4"))
    assert load_config(["configs/llama3/tiny.yml"], ["vocab_size=512"]).num_layers == 4  # a file here wins


def test_a_config_neither_here_nor_shipped_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        load_config(["llama3/tinny"])
    (line,) = excinfo.value.problems
    assert line.startswith("llama3/tinny: config file not found, here or among the configs shipped with neox_llama "
                           "(did you mean 'llama3/tiny'?)")
    assert "finetune/lora" in line and "llama3.1/405B" in line
