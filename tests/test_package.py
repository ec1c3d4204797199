"""Installable: a wheel with the presets as package data and console scripts that work from any directory."""

from __future__ import annotations

import re
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers.runner import ROOT, run

SCRIPTS = {"neox-train", "neox-preprocess", "neox-convert-to-hf", "neox-convert-from-hf", "neox-generate",
           "neox-convert-neox-config", "neox-merge-lora", "neox-evaluate", "neox-serve"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def test_pyproject_dependencies_match_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    assert declared == pins
    assert set(project["scripts"]) == SCRIPTS


def test_no_module_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for folder in ("neox_llama", "tools", "benchmarks", "tests")
                 for p in (ROOT / folder).rglob("*.py")
                 if re.search(r"sys\.path\.(insert|append)", p.read_text(encoding="utf-8")) and p.name != "test_package.py"]
    assert not offenders


@pytest.mark.slow
def test_the_wheel_ships_presets_cli_and_entry_points(tmp_path):
    proc = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                str(tmp_path), str(ROOT)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("neox_llama-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"neox_llama/configs/llama3/tiny.yml", "neox_llama/configs/llama2/7B.yml", "neox_llama/configs/local.yml",
            "neox_llama/cli/train.py", "neox_llama/checkpoint/run.py"} <= names
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "neox_llama").rglob("*.py")}
    assert not sources - names, f"modules missing from the wheel (pyproject.toml packages): {sorted(sources - names)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{s} = " in text for s in SCRIPTS)


def test_console_scripts_work_from_another_directory(tmp_path):
    (tmp_path / "mine.yml").write_text("vocab_size: 256\ntokenizer_type: null\nvocab_file: null\n")
    # the shipped presets by name, from the package data (no configs/ folder here)
    proc = run([_bin("neox-train"), "llama3/tiny", "configs/local.yml", "mine.yml", "--dry-run"], cwd=tmp_path,
               timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "configs/llama3/tiny.yml" in proc.stdout and "configs/local.yml" in proc.stdout
    assert "neox_llama/cli/train.py --config" in proc.stdout
    for script in SCRIPTS:  # each usage line names the console script, as it was run
        helped = run([_bin(script), "--help"], cwd=tmp_path, timeout=120)
        assert helped.returncode == 0 and f"usage: {script} " in helped.stdout, (script, helped.stderr[-2000:])
    bad = run([_bin("neox-generate"), "--checkpoint", str(tmp_path / "none"), "--prompt", "x"], cwd=tmp_path)
    assert bad.returncode == 2 and "checkpoint directory not found" in bad.stderr and "Traceback" not in bad.stderr
