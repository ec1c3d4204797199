"""The one CLI runner (neox_llama/cli/runner.py): a project error is one line on stderr and that error's exit
status, Ctrl-C is exit 130 without a traceback, and every console script and tool goes through it."""

from __future__ import annotations

import importlib
import sys
import tomllib

import pytest
from helpers import inprocess
from helpers.runner import ROOT, run

from neox_llama.cli import runner
from neox_llama.cli.runner import command
from neox_llama.config.loading import ConfigError
from neox_llama.errors import NeoxLlamaError


class Busy(NeoxLlamaError):
    """A project error with an exit status of its own (no real one differs from the default 2 today)."""

    exit_code = 3


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_project_error_is_one_line_and_its_own_exit_status():
    @command("demo.py")
    def demo(argv: list[str]) -> int:
        raise Busy(f"the GPU is busy ({' '.join(argv)})")

    proc = inprocess.call(demo, ["a", "b"])
    assert proc.returncode == 3
    assert proc.stderr == "demo.py: error: the GPU is busy (a b)\n"


def test_a_project_error_raised_deep_inside_a_real_main(monkeypatch, tmp_path):
    from neox_llama.cli import merge_lora

    def refuse(path, weight):
        raise Busy(f"{path}: locked by another merge")

    monkeypatch.setattr(merge_lora.Adapter, "open", staticmethod(refuse))
    proc = inprocess.tool("merge_lora.py", "--checkpoint", str(tmp_path / "a"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 3
    assert _lines(proc.stderr) == [f"merge_lora.py: error: {tmp_path / 'a'}: locked by another merge"]
    assert "Traceback" not in proc.stderr


def test_an_error_with_several_problems_is_a_prefixed_line_per_problem():
    @command("demo.py")
    def demo(argv: list[str]) -> int:
        raise ConfigError(["a.yml: unknown key 'x'", "b.yml: lr: must be positive"])

    proc = inprocess.call(demo, [])
    assert proc.returncode == 2
    assert _lines(proc.stderr) == ["demo.py: error: a.yml: unknown key 'x'", "demo.py: error: b.yml: lr: must be positive"]


def test_ctrl_c_is_exit_130_in_one_line_without_a_traceback(monkeypatch, tmp_path):
    from neox_llama.cli import plot_metrics, preprocess_data

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0, "lr": 0.1, "tokens_per_sec": 5}\n')
    monkeypatch.setattr(plot_metrics, "read_records", interrupt)
    proc = inprocess.tool("plot_metrics.py", str(metrics))
    assert (proc.returncode, proc.stderr) == (130, "plot_metrics.py: interrupted\n")

    monkeypatch.setattr(preprocess_data, "preprocess", interrupt)  # a tool that says more on Ctrl-C
    proc = inprocess.tool("preprocess_data.py", "--input", str(metrics), "--output-prefix", str(tmp_path / "o"),
                          "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(tmp_path / "t.model"))
    assert (proc.returncode, proc.stderr) == (130, "preprocess_data.py: interrupted; no output file was written\n")


def test_usage_errors_and_bugs_pass_through():
    @command("demo.py")
    def demo(argv: list[str]) -> int:
        if argv == ["usage"]:
            raise SystemExit(2)
        raise ValueError("a bug")

    with pytest.raises(SystemExit):
        demo(["usage"])
    with pytest.raises(ValueError, match="a bug"):
        demo([])


def test_without_argv_main_reads_the_command_line(monkeypatch, capsys, tmp_path):
    from neox_llama.cli import plot_metrics

    monkeypatch.setattr(sys, "argv", ["neox-plot", str(tmp_path / "none.jsonl")])
    assert plot_metrics.main() == 2
    assert capsys.readouterr().err == f"plot_metrics.py: error: {tmp_path / 'none.jsonl'} not found\n"


def test_every_console_script_goes_through_the_runner():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert runner.is_command(obj), f"{name} = {target} is not built by neox_llama.cli.runner.command"


def test_every_cli_module_and_tool_goes_through_the_runner():
    modules = sorted(p.stem for p in (ROOT / "neox_llama/cli").glob("*.py") if p.stem not in ("__init__", "runner"))
    for name in modules:
        main = importlib.import_module(f"neox_llama.cli.{name}").main
        assert runner.is_command(main), name
    tools = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))
    assert set(tools) <= set(modules), "every tool's logic lives in neox_llama/cli/"
    for name in tools:  # thin: the tool only runs the package's main
        text = (ROOT / "tools" / f"{name}.py").read_text(encoding="utf-8")
        assert f"from neox_llama.cli.{name} import main" in text and len(text.splitlines()) <= 16, name
    for script in ("deepy.py", "train.py"):
        assert f"from neox_llama.cli.{script[:-3]} import main" in (ROOT / script).read_text(encoding="utf-8")
    for name in modules:  # python -m neox_llama.cli.NAME runs it too
        assert 'if __name__ == "__main__":' in (ROOT / "neox_llama/cli" / f"{name}.py").read_text(encoding="utf-8"), name


@pytest.mark.parametrize("how", ["tool", "module"])
def test_a_real_tool_in_a_process_of_its_own(tmp_path, how):
    start = [str(ROOT / "tools" / "plot_metrics.py")] if how == "tool" else ["-m", "neox_llama.cli.plot_metrics"]
    proc = run([sys.executable, *start, str(tmp_path / "missing.jsonl")], timeout=120)
    assert proc.returncode == 2
    assert _lines(proc.stderr) == [f"plot_metrics.py: error: {tmp_path / 'missing.jsonl'} not found"]
    assert "Traceback" not in proc.stderr
