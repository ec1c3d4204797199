"""benchmarks/run.py's command line and the side protocol it reads (no timings are asserted)."""

from __future__ import annotations

import json
import sys

from helpers.runner import ROOT, run


def test_unknown_case_is_one_line_naming_the_cases():
    proc = run([sys.executable, "benchmarks/run.py", "--only", "model_step_fp32,nonsense"], timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "unknown case nonsense" in last and "deepy_fp32" in last and "Traceback" not in proc.stderr


def test_a_side_prints_one_json_line_with_its_rate_and_peak_memory():
    proc = run([sys.executable, "-m", "benchmarks.sides", "dataloader", "--threads", "1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rate"] > 0 and result["peak_rss_mb"] > 100  # samples/s; torch alone is > 100 MB resident
    assert (ROOT / "benchmarks" / "run.py").is_file()
