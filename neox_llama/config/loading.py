"""Reading YAML files and ``key=value`` overrides, merging them left to right with provenance."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from neox_llama.config import presets
from neox_llama.config.schema import Config
from neox_llama.config.typecheck import build_dataclass, did_you_mean, is_text_key, user_fields
from neox_llama.errors import NeoxLlamaError
from neox_llama.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

COMMAND_LINE = "command line"


class ConfigError(NeoxLlamaError):
    """One or more problems with the configuration; each is a one-line message naming file and key."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)  # resolve `<<: *anchor` merge keys first, as SafeLoader does
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not {type(key).__name__}", key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first on line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings our loader would read as floats (e.g. '1e5'), so files round-trip."""


# YAML 1.1 reads `1e-5` (no dot) as a string; read it as the float everyone means, in files and overrides.
_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_UniqueKeyLoader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in one YAML file; ConfigError names the file (and line) when it cannot be read."""
    label = str(path)
    if not Path(path).is_file():
        raise ConfigError([f"{label}: config file not found"])
    try:
        with open(path, encoding="utf-8") as handle:
            data = _load_yaml_text(handle.read())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
        raise ConfigError([f"{where}: YAML error: {err.problem or err.context}"]) from None
    except (yaml.YAMLError, UnicodeDecodeError, TypeError) as err:
        raise ConfigError([f"{label}: cannot read YAML: {err}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{label}: expected a mapping of keys to values at the top, got {type(data).__name__}"])
    return data


def parse_override(arg: str) -> dict:
    """``a.b.c=value`` -> ``{'a': {'b': {'c': value}}}``.

    The value is read as YAML (``true``, ``1e-4``, ``[1, 2]``), except for keys the schema types as text:
    those take the text as written (so ``wandb_group=run #2`` or ``data_path=a: b`` survive intact).
    """
    key, sep, text = arg.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"{COMMAND_LINE}: '{arg}' is neither a config file (.yml) nor key=value"])
    if not text.strip() or text.strip() in ("null", "~"):
        value = None
    elif is_text_key(key):
        value = text
    else:
        try:
            value = _load_yaml_text(text)
        except yaml.YAMLError:
            raise ConfigError([f"{COMMAND_LINE}: {key}: cannot read value {text!r} as YAML"]) from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _leaves(mapping: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def merge_layers(layers: Sequence[tuple[str, dict]]) -> tuple[dict, dict[str, str]]:
    """Merge (label, mapping) layers left to right; nested mappings merge key by key.

    Returns the merged mapping and, for every dotted key, the label of the layer that set it last.
    Every value a later layer changes is logged as ``key: old (label A) -> new (label B)``.
    """
    merged: dict = {}
    sources: dict[str, str] = {}

    def merge(dst: dict, src: dict, label: str, prefix: str) -> None:
        for key, value in src.items():
            dotted = f"{prefix}{key}"
            old = dst.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                merge(old, value, label, dotted + ".")
                sources[dotted] = label  # the mapping as a whole was last touched here
                continue
            if key in dst and old != value:
                logger.info("%s: %r (%s) -> %r (%s)", dotted, old, sources.get(dotted, "?"), value, label)
            dst[key] = _copy(value)
            for sub in [k for k in sources if k == dotted or k.startswith(dotted + ".")]:
                del sources[sub]
            sources[dotted] = label
            if isinstance(value, dict):
                for leaf, _ in _leaves(value, dotted + "."):
                    sources[leaf] = label

    for label, mapping in layers:
        merge(merged, mapping, label, "")
    return merged, sources


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _with_preset(layers: list[tuple[str, dict]], file_paths: list[Path]) -> list[tuple[str, dict]]:
    """Put the preset chosen by ``model_name`` first, unless its file is already listed."""
    name, name_label = None, None
    for label, mapping in layers:
        if "model_name" in mapping and mapping["model_name"] is not None:
            name, name_label = mapping["model_name"], label
    if name is None:
        return layers
    if not isinstance(name, str):
        raise ConfigError([f"{name_label}: model_name: expected str, got {name!r}"])
    path = presets.preset_path(name)
    if path is None:
        hint = did_you_mean(name, presets.known_names())
        raise ConfigError([f"{name_label}: model_name '{name}' is not a known model{hint}; "
                           f"known: {', '.join(presets.known_names())}"])
    listed = {p.resolve() for p in file_paths}
    if path.resolve() in listed:
        return layers
    preset_files = {(presets.CONFIG_DIR / rel).resolve() for rel in presets.PRESETS.values()}
    clash = [str(p) for p in file_paths if p.resolve() in preset_files]
    if clash:
        raise ConfigError([f"{name_label}: model_name '{name}' selects {path.name} of {path.parent.name}, "
                           f"but the preset {clash[0]} is listed too; list one or the other"])
    label = f"{os.path.relpath(path)} (model_name {name})"
    return [(label, read_yaml(path)), *layers]


def locate_config(arg: str | os.PathLike) -> Path:
    """The config file an argument names: a path that exists wins; else a config shipped with the package, by
    its name under ``configs/`` (``llama3/tiny``, ``configs/llama3/tiny.yml``, ``local.yml``) or a model name
    (:func:`presets.shipped_config`), so installed console scripts reach the presets from any directory."""
    path = Path(arg)
    if path.is_file() or path.is_absolute():
        return path  # an absolute path names no shipped config: read_yaml says it is not found
    shipped = presets.shipped_config(str(arg))
    if shipped is None:
        hint = did_you_mean(str(arg).removeprefix("configs/").removesuffix(".yml"), presets.shipped_names())
        raise ConfigError([f"{arg}: config file not found, here or among the configs shipped with neox_llama{hint} "
                           f"(those: {', '.join(presets.shipped_names())}, or a model name such as tiny-llama3)"])
    logger.info("%s: no such file here; reading the shipped config %s", arg, shipped)
    return shipped


def load_raw(files: Sequence[str | os.PathLike], overrides: Sequence[str] = (), *,
             apply_presets: bool = True) -> tuple[dict, dict[str, str]]:
    """Read, check and merge config files and overrides; returns the merged mapping and its provenance.

    A file that does not exist here is looked up among the shipped configs (:func:`locate_config`).
    ``apply_presets=False`` reads an already merged file (a launched run's or a checkpoint's config.yml)
    as it is, without putting the preset named by its model_name underneath again.
    """
    problems: list[str] = []
    layers: list[tuple[str, dict]] = []
    paths: list[Path] = []
    for arg in files:
        try:
            path = locate_config(arg) if apply_presets else Path(arg)
            layers.append((str(arg) if path == Path(arg) else str(path), read_yaml(path)))
            paths.append(path)
        except ConfigError as err:
            problems.extend(err.problems)
    for arg in overrides:
        try:
            layers.append((COMMAND_LINE, parse_override(arg)))
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    if apply_presets:
        layers = _with_preset(layers, paths)
    return merge_layers(layers)


def build_config(raw: dict, sources: dict[str, str], *, problems: list[str] | None = None) -> Config:
    """Type-check a merged mapping into a Config; every unknown or mistyped key is reported at once.

    Without ``problems`` any problem raises ConfigError. With a ``problems`` list they are appended
    to it instead and the Config comes back with defaults in place of the bad entries (named in
    ``cfg.invalid_keys``), so that the cross-checks can run and be reported in the same go.
    """
    found: list[str] = []
    invalid: set[str] = set()

    def report(dotted: str, message: str) -> None:
        top = dotted.split(".")[0].split("[")[0]
        invalid.add(top)
        origin = sources.get(dotted) or sources.get(top) or next(
            (v for k, v in sources.items() if k.startswith(dotted + ".")), "?")
        found.append(f"{origin}: {message}")

    cfg = build_dataclass(Config, raw, report)
    if found and problems is None:
        raise ConfigError(found)
    if problems is not None:
        problems.extend(found)
    cfg.raw, cfg.sources, cfg.invalid_keys = raw, sources, invalid
    return cfg


def dump_raw(raw: dict, path: str | os.PathLike, header: str = "") -> Path:
    """Write a merged mapping as YAML, atomically; loading it back gives the same Config."""
    return atomic_write_text(path, dump_raw_text(raw, header))


def dump_raw_text(raw: dict, header: str = "") -> str:
    """A merged mapping as the YAML text :func:`dump_raw` writes."""
    known = {f.name for f in user_fields(Config)}
    ordered = {k: raw[k] for k in [f.name for f in user_fields(Config)] if k in raw}
    ordered.update({k: v for k, v in raw.items() if k not in known})
    return (header + "\n" if header else "") + yaml.dump(ordered, Dumper=_Dumper, sort_keys=False,
                                                          default_flow_style=None, allow_unicode=True)
