"""deepy.py as users run it: dry runs, refusing bad configs before anything starts, and real launches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers.inprocess import call
from helpers.runner import ROOT, free_port, run_deepy

from neox_llama.cli import deepy


def deepy_checks(*args: str):
    """``python deepy.py ARGS`` where it stops before starting anything (a dry run, a refusal): in this process,
    through deepy.py's checks alone, so that a run it would wrongly start fails the test (exit 99) instead of
    replacing the test process with the launch."""

    def checks(argv: list[str]) -> int:
        prepared = deepy.prepare_launch(argv)
        if isinstance(prepared, int):
            return prepared
        print(f"deepy.py would have started {prepared.world_size} rank(s): {prepared.command.shell()}", file=sys.stderr)
        return 99

    return call(checks, list(args), cwd=ROOT)


def test_dry_run_of_llama2_7b_prints_a_sane_plan(tmp_path):
    log_dir = tmp_path / "logs"
    proc = deepy_checks("train.py", "configs/llama2/7B.yml", "configs/local.yml", f"log_dir={log_dir}",
                     "num_gpus=8", "model_parallel_size=2", "pipe_parallel_size=2", "train_batch_size=64", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "parameters: 6,738,415,616 total" in out
    assert "world size 8 = pipe_parallel_size 2 x model_parallel_size 2 x data parallel 2" in out
    assert "train_batch_size 64 = micro 32 x accumulation 1 x data parallel 2" in out
    assert "hidden_size: 4096" in out and "configs/llama2/7B.yml" in out
    assert '"train_batch_size": 64' in out  # the derived DeepSpeed config
    assert "-m deepspeed.launcher.runner" in out and "--num_gpus 8" in out and "OMP_NUM_THREADS=" in out
    assert not log_dir.exists()  # a dry run writes nothing


def test_model_name_on_the_command_line_is_enough(tmp_path):
    proc = deepy_checks("train.py", "configs/local.yml", "model_name=Llama-3.2-1B", f"log_dir={tmp_path}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 1,235,814,400 total" in proc.stdout and "head tied to embedding" in proc.stdout


def test_bad_config_exits_non_zero_before_anything_starts(tmp_path):
    typo = tmp_path / "typo.yml"
    typo.write_text("hiden_size: 1\n")
    log_dir = tmp_path / "logs"
    proc = deepy_checks("train.py", "configs/llama3/tiny.yml", str(typo), "num_gpus=2", "model_parallel_size=4",
                     f"log_dir={log_dir}")
    assert proc.returncode == 2
    assert f"{typo}: unknown key 'hiden_size' (did you mean 'hidden_size'?)" in proc.stderr
    assert "nothing was started" in proc.stderr
    assert "deepspeed.launcher" not in proc.stderr + proc.stdout and not log_dir.exists()


def test_cross_check_errors_exit_before_spawning(tmp_path):
    log_dir = tmp_path / "logs"
    proc = deepy_checks("train.py", "configs/llama3/tiny.yml", "num_gpus=2", "model_parallel_size=4", f"log_dir={log_dir}")
    assert proc.returncode == 2
    assert "num_kv_heads 2 is not divisible by model_parallel_size 4" in proc.stderr
    assert "world size 2 is not divisible by pipe_parallel_size 1 x model_parallel_size 4" in proc.stderr
    assert not log_dir.exists()


def test_usage_errors():  # real processes: deepy.py's own command line
    assert run_deepy().returncode == 2  # usage errors exit 2, like config errors
    proc = run_deepy("nope.py", "configs/local.yml")
    assert proc.returncode == 2 and "script nope.py not found" in proc.stderr
    proc = run_deepy("train.py", "configs/local.yml", "--fast")
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


NEOX_TRAIN = [sys.executable, "/opt/venv/bin/neox-train"]
"""The process's command line when the installed console script runs (what argparse and deepy read the name from)."""


def neox_train(*args: str, cwd: Path):
    """``neox-train ARGS`` in this process (dry runs and refusals only: a real start would replace the process)."""
    return call(deepy.train_main, list(args), cwd=cwd, args=[*NEOX_TRAIN, *args])


def test_neox_train_reaches_the_shipped_configs_by_name_from_another_directory(tmp_path):
    (tmp_path / "mine.yml").write_text("vocab_size: 256\ntokenizer_type: null\nvocab_file: null\n")
    proc = neox_train("llama3/tiny", "configs/local.yml", "mine.yml", f"log_dir={tmp_path / 'logs'}", "--dry-run",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "llama3/tiny: no such file here; reading the shipped config" in proc.stderr
    assert "num_layers: 2 " in proc.stdout and "configs/llama3/tiny.yml" in proc.stdout
    assert "data_path: data/shakespeare_text_document" in proc.stdout and "configs/local.yml" in proc.stdout
    (tmp_path / "local.yml").write_text("seed: 77\n")  # a file here wins over the shipped one of the same name...
    proc = neox_train("llama3/tiny", "local.yml", "mine.yml", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0 and "seed: 77" in proc.stdout and "data_path: data/" not in proc.stdout, proc.stderr
    proc = neox_train("llama3/tiny", "--preset", "local", "mine.yml", "--dry-run", cwd=tmp_path)  # ...unless --preset
    assert proc.returncode == 0 and "seed: 77" not in proc.stdout and "data_path: data/" in proc.stdout, proc.stderr
    proc = neox_train("model_name=tiny-llama3", "vocab_size=256", "tokenizer_type=null", "vocab_file=null",
                      "--dry-run", cwd=tmp_path)  # a model name alone, no file
    assert proc.returncode == 0 and "num_layers: 2 " in proc.stdout, proc.stderr


def test_usage_lines_name_the_command_that_ran(tmp_path):
    proc = neox_train(cwd=tmp_path)
    assert proc.returncode == 2 and "no config file given" in proc.stderr
    assert "usage: neox-train CONFIG [CONFIG ...] [key=value ...] [--preset NAME]" in proc.stderr
    proc = neox_train("--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: neox-train CONFIG")
    assert "--preset NAME" in proc.stdout and "shipped configs: " in proc.stdout and "llama3/tiny" in proc.stdout
    for argv0, prog in ((ROOT / "deepy.py", "python deepy.py"),
                        (ROOT / "neox_llama/cli/deepy.py", "python -m neox_llama.cli.deepy")):
        proc = call(deepy.main, ["--fast"], args=[sys.executable, str(argv0), "--fast"])
        assert proc.returncode == 2 and f"usage: {prog} SCRIPT.py CONFIG" in proc.stderr, proc.stderr


def _launch(tmp_path: Path, *extra: str, env: dict | None = None):
    from helpers.training import write_corpus

    corpus = write_corpus(tmp_path / "chain", docs=60)
    log_dir = tmp_path / "logs"
    proc = run_deepy("train.py", "configs/llama3/tiny.yml", f"log_dir={log_dir}", f"master_port={free_port()}",
                     "vocab_size=256", "tokenizer_type=null", "vocab_file=null", f"data_path={corpus}", "train_iters=2",
                     "seq_length=32", "eval_iters=1", "num_workers=0", *extra, env=env)
    return proc, log_dir


@pytest.mark.dist
def test_two_ranks_through_the_deepspeed_launcher(tmp_path):
    # a build lock left by a process killed while compiling DeepSpeed's shared-memory op: a run that built
    # that op would wait on it for ever; ours never builds it (neox_llama.distributed)
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    proc, log_dir = _launch(tmp_path, "num_gpus=2", env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    port = next(a.split("=")[1] for a in proc.args if a.startswith("master_port="))
    leaked = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert not leaked, leaked  # no DeepSpeed CPU shared-memory segment is left in /dev/shm
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "deepspeed.launcher.runner" in output and "--num_gpus 2" in output
    from neox_llama.config.validation import auto_precision

    # the tiny preset's precision: auto is bf16 on a CPU with native bf16, else fp32
    assert f"({auto_precision('cpu')}, pp 1 x tp 1 x dp 2)" in output and "step      2 | loss" in output
    written = (log_dir / "config.yml").read_text()
    assert written.startswith("# merged by deepy.py from: configs/llama3/tiny.yml")
    assert "num_gpus: 2" in written and "hidden_size: 64" in written


@pytest.mark.dist
def test_one_rank_runs_without_the_launcher(tmp_path):
    proc, log_dir = _launch(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed.launcher" not in proc.stdout + proc.stderr.replace("starting 1 rank(s)", "")
    assert "pp 1 x tp 1 x dp 1" in proc.stderr and (log_dir / "config.yml").is_file()


def test_train_py_refuses_to_start_without_deepy(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    settings = yaml.safe_load((ROOT / "configs/llama3/tiny.yml").read_text())
    settings.update(vocab_size=256, tokenizer_type=None, vocab_file=None)
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "start training through deepy.py" in proc.stderr
