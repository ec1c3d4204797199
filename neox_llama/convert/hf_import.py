"""A local Hugging Face Llama directory -> a neox_llama checkpoint that ``finetune: true`` loads at any layout.

Tensors are streamed one layer at a time (safetensors, or ``.bin`` read with ``weights_only=True``), so
memory stays near one layer plus the output; each is checked for NaN and Inf as it is read. The checkpoint
holds ``global_step0/weights/``, a generated ``config.yml``, the tokenizer file and ``metadata.json``;
``{output}/model.yml`` is a config to list when fine-tuning (``python deepy.py train.py OUTPUT/model.yml
configs/local.yml``). A chat template that renders as one of our prompt styles (:mod:`.chat_template`) becomes the
checkpoint's ``prompt_style`` (metadata.json), which generation and chat default to; any other is said in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from neox_llama.checkpoint.metadata import Layout, Metadata, write_metadata
from neox_llama.checkpoint.paths import CheckpointError, layer_file
from neox_llama.checkpoint.weights import check_finite, write_layer_file
from neox_llama.config import load_config
from neox_llama.convert.chat_template import recognise
from neox_llama.convert.hf_names import expected_shape, hf_to_ours
from neox_llama.model.args import ROPE_KEYS, LlamaArgs
from neox_llama.utils.files import atomic_write_text, building_dir, output_dir_problem

logger = logging.getLogger(__name__)


def _model_settings(hf: dict, path: Path, pp: int, tp: int) -> dict:
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not a Llama model "
                              "(only LlamaForCausalLM and LlamaForSequenceClassification directories can be imported)")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if reward and labels != 1:
        raise CheckpointError(f"{path}: a sequence classifier with {labels} labels; only reward models (num_labels 1) "
                              "can be imported")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind not in (*ROPE_KEYS, "default", None):
        raise CheckpointError(f"{path}: rope scaling {kind!r} is not supported ({', '.join(ROPE_KEYS)} are)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {hf.get('hidden_act')!r}; Llama uses silu (SwiGLU)")
    max_pos = hf.get("max_position_embeddings", 4096)
    settings = {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"], "num_attention_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads, "intermediate_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"], "make_vocab_size_divisible_by": tp,
        "max_position_embeddings": max_pos, "seq_length": min(max_pos, 4096),
        "norm": "rmsnorm", "rms_norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)), "pos_emb": "rotary",
        "rotary_emb_base": float(theta), "activation": "swiglu",
        "no_weight_tying": not hf.get("tie_word_embeddings", False),
        "use_bias_in_attn_linear": bool(hf.get("attention_bias", False)), "use_bias_in_mlp": bool(hf.get("mlp_bias", False)),
        "pipe_parallel_size": pp, "model_parallel_size": tp,
        **({"reward_head": True, "no_weight_tying": True} if reward else {}),
        "precision": "fp32" if str(hf.get("dtype", hf.get("torch_dtype"))) == "float32" else "bf16",
    }
    if kind in ROPE_KEYS:
        settings["rope_scaling"] = {"rope_type": kind, **{k: scaling[k] for k in ROPE_KEYS[kind][1:]
                                                          if scaling.get(k) is not None}}
        if kind in ("yarn", "longrope") and "original_max_position_embeddings" not in settings["rope_scaling"]:
            raise CheckpointError(f"{path}: {kind} rope scaling without original_max_position_embeddings")
    return settings


def _tokenizer_settings(hf_dir: Path) -> tuple[dict, Path | None]:
    model = hf_dir / "tokenizer.model"
    if model.is_file():
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_file=str(model))
            return {"tokenizer_type": "SPMTokenizer"}, model
        except (RuntimeError, OSError):
            return {"tokenizer_type": "Llama3Tokenizer"}, model
    if (hf_dir / "tokenizer.json").is_file():
        return {"tokenizer_type": "HFTokenizer"}, hf_dir / "tokenizer.json"
    return {}, None


def _chat_template(hf_dir: Path) -> tuple[str | None, str | None, str | None]:
    """The directory's chat template (chat_template.jinja, else tokenizer_config.json's ``chat_template``, the
    default one of a list) and its BOS and EOS texts (tokenizer_config.json, else special_tokens_map.json); Nones
    where there is none or it cannot be read."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second's keys win
        try:
            data = json.loads((hf_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        config.update(data if isinstance(data, dict) else {})
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            template = None

    def text(token) -> str | None:  # "<s>" or {"content": "<s>", ...}
        return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None

    return (template if isinstance(template, str) else None), text(config.get("bos_token")), \
        text(config.get("eos_token"))


def prompt_style_of(hf_dir: Path) -> str | None:
    """The prompt style whose chat template the directory carries, or None (one line says which case)."""
    template, bos, eos = _chat_template(hf_dir)
    if template is None:
        return None
    style = recognise(template, bos, eos)
    if style is None:
        logger.info("%s: chat template not recognised as one of our prompt styles; prompt_style stays unset "
                    "(generation and chat use the model family's default; set prompt_style or --prompt-style)", hf_dir)
    else:
        logger.info("%s: chat template is prompt style %s (saved as the checkpoint's prompt_style)", hf_dir, style)
    return style


@contextlib.contextmanager
def _reading(file: Path):
    """Turn a reader's failure on a truncated or corrupt weight file into one error naming the file."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable weight file ({type(err).__name__}: {err})") from None


class _TensorSource:
    """Reads single tensors by name from the directory's safetensors or .bin shards."""

    def __init__(self, hf_dir: Path):
        files = sorted(hf_dir.glob("*.safetensors"))
        self.where: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict] = {}
        if files:
            for file in files:
                with _reading(file), safe_open(str(file), framework="pt") as handle:
                    self.where.update(dict.fromkeys(handle.keys(), file))
        else:
            for file in sorted(hf_dir.glob("pytorch_model*.bin")):
                with _reading(file):
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                self._bin_cache[file] = state
                self.where.update(dict.fromkeys(state, file))
        if not self.where:
            raise CheckpointError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weight files")

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as read, checked for NaN and Inf (an error naming the file and the tensor)."""
        file = self.where[name]
        if file in self._bin_cache:
            tensor = self._bin_cache[file][name]
        else:
            with _reading(file), safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(name)
        return check_finite(tensor, file, name, "the model's weights are damaged; nothing was written")


def import_from_hf(hf_dir: str | Path, output: str | Path, pipe_parallel_size: int = 1,
                   model_parallel_size: int = 1, force: bool = False) -> Path:
    """Convert; returns the checkpoint folder (``output/global_step0``)."""
    hf_dir, output = Path(hf_dir), Path(output)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    problem = output_dir_problem(output, force)
    if problem:
        raise CheckpointError(problem)
    try:
        hf = json.loads(config_path.read_text())
        settings = _model_settings(hf, config_path, pipe_parallel_size, model_parallel_size)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    except KeyError as err:
        raise CheckpointError(f"{config_path}: missing key {err}") from None
    tok_settings, tok_file = _tokenizer_settings(hf_dir)
    with building_dir(output) as tmp:
        folder = tmp / "global_step0"
        (folder / "weights").mkdir(parents=True)
        raw = {**settings, **tok_settings}
        if tok_file is not None:
            shutil.copyfile(tok_file, folder / tok_file.name)
            raw["vocab_file"] = tok_file.name
        cfg_file = folder / "config.yml"
        cfg_file.write_text("# generated by tools/convert_from_hf.py from " + str(hf_dir) + "\n" + yaml.safe_dump(raw, sort_keys=False))
        world = pipe_parallel_size * model_parallel_size
        cfg = load_config([cfg_file], ["vocab_file=null", "tokenizer_type=null"], world_size=world, apply_presets=False)
        args = LlamaArgs.from_config(cfg)
        _convert_weights(_TensorSource(hf_dir), args, hf["vocab_size"], folder, hf_dir)
        layout = Layout(pipe_parallel_size, model_parallel_size, 1, -1, world)
        write_metadata(folder, Metadata(tag="global_step0", layout=layout, precision=settings["precision"],
                                        tokenizer_files=[tok_file.name] if tok_file else [],
                                        converted_from=str(hf_dir), prompt_style=prompt_style_of(hf_dir)))
        atomic_write_text(tmp / "latest", "global_step0")
        model_yml = {k: v for k, v in raw.items() if k != "vocab_file"}
        if tok_file is not None:
            model_yml["vocab_file"] = str((output / "global_step0" / tok_file.name).resolve())
        model_yml.update(finetune=True, load=str(output.resolve()))
        atomic_write_text(tmp / "model.yml", "# fine-tune this model: python deepy.py train.py THIS.yml "
                          "configs/finetune/full.yml load=THIS_FOLDER\n" + yaml.safe_dump(model_yml, sort_keys=False))
    logger.info("converted %s to %s", hf_dir, output)
    return output / "global_step0"


def _convert_weights(source: _TensorSource, args: LlamaArgs, true_vocab: int, folder: Path, hf_dir: Path) -> None:
    table = hf_to_ours(args)
    by_layer: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for hf_name, ours in table.items():
        if hf_name.endswith(".bias"):  # biases exist only when config.json asks for them
            wanted = args.use_bias_in_mlp if ".mlp." in hf_name else args.use_bias_in_attn_linear
            if not wanted:
                continue
        index, name = ours.split(".", 1)
        by_layer[int(index)].append((hf_name, name))
    for index in sorted(by_layer):
        tensors = {}
        for hf_name, name in by_layer[index]:
            if hf_name not in source.where:
                raise CheckpointError(f"{hf_dir}: tensor {hf_name} is missing")
            tensor = source.get(hf_name)
            if name in ("word_embeddings.weight", "head.weight") and args.vocab_size > true_vocab:
                tensor = torch.cat([tensor, tensor.new_zeros(args.vocab_size - true_vocab, tensor.shape[1])])
            expected = expected_shape(args, name)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{hf_dir}: {hf_name} has shape {tuple(tensor.shape)}, but config.json implies "
                                      f"{expected}")
            tensors[name] = tensor.contiguous()
        write_layer_file(layer_file(folder, index), tensors)
