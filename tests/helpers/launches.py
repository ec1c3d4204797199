"""Multi-rank cases, registered by the test modules and run in one DeepSpeed launch per world size.

A test module registers each case it needs at import (collection) time::

    register(Case("lora-pp2", world=2, kind="lora_steps", prepare=lambda folder: [...argv...]))

and its tests read the outcome through the session fixture ``launched`` (``launched("lora-pp2")``). When the
first test asks, every registered case that the collected tests use (``case`` in their parameters, or a
``uses_cases`` marker) and that shares its world size runs in one launch of ``tests/workers/cases.py``; a
world size of 1 runs in this process. ``prepare(folder)`` returns the case's arguments (it may write inputs into
``folder``, the case's own empty folder); for ``kind="train"`` it returns the ``deepy.py`` arguments, which are
checked and written here as deepy.py does, then trained on the launched ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from helpers.runner import ROOT, launch

WORKER = ROOT / "tests" / "workers" / "cases.py"


@dataclass
class Case:
    """One multi-rank case of the suite."""

    name: str
    """Unique name; tests ask for the outcome by it."""
    world: int
    """Number of ranks."""
    kind: str
    """``parallel_step``, ``lora_steps`` (tests/workers/) or ``train`` (a deepy.py training run)."""
    prepare: Callable[[Path], list[str]]
    """folder -> the case's arguments (deepy.py's for ``train``); runs just before the launch."""


@dataclass
class Outcome:
    """What a case left: its folder, every rank's exit status (None: never ran) and the ranks' logs."""

    name: str
    folder: Path
    codes: list[int | None] = field(default_factory=list)
    stderr: str = ""
    launch_log: str = ""

    @property
    def returncode(self) -> int | None:
        """The case's exit status: rank 0's, or the first other non-zero one."""
        if any(code is None for code in self.codes):
            return None
        return next((code for code in self.codes if code), self.codes[0] if self.codes else None)

    @property
    def stdout(self) -> str:
        return ""

    def check(self) -> Outcome:
        """Fail the test with the logs unless every rank finished with status 0."""
        assert self.returncode == 0, f"case {self.name}: exit {self.codes}\n{self.stderr[-4000:]}\n{self.launch_log[-3000:]}"
        return self


CASES: dict[str, Case] = {}


def register(case: Case) -> None:
    """Make a case known to the session (at import of the test module that needs it)."""
    if case.name in CASES:
        raise ValueError(f"case {case.name} is registered twice")
    CASES[case.name] = case


class Launcher:
    """The session's runs of the registered cases (the ``launched`` fixture)."""

    def __init__(self, workdir: Path, wanted: set[str]):
        self.workdir = workdir
        self.wanted = wanted
        self.outcomes: dict[str, Outcome] = {}

    def __call__(self, name: str) -> Outcome:
        if name not in CASES:
            raise KeyError(f"no case {name} is registered")
        if name not in self.outcomes:
            world = CASES[name].world
            if world > 1 and name not in self.wanted:  # it would cost a launch of its own
                raise AssertionError(f"the test reads case {name} without declaring it: name it in a `case` parameter "
                                     "or a uses_cases marker, so that it joins its world size's one launch")
            batch = [c for c in CASES.values() if c.world == world and (c.name in self.wanted or c.name == name)
                     and c.name not in self.outcomes]  # one-rank cases may be read undeclared: they run here
            self._run(world, batch)
        return self.outcomes[name]

    def _run(self, world: int, batch: list[Case]) -> None:
        plan, prepared_log = [], {}
        for case in batch:
            folder = self.workdir / case.name
            folder.mkdir(parents=True)
            try:
                argv = [str(a) for a in case.prepare(folder)]
            except Exception:  # this case fails with the reason; the others of its world size still run
                self.outcomes[case.name] = Outcome(case.name, folder, [None] * world, traceback.format_exc())
                continue
            if case.kind == "train":
                argv, checked, planned = _prepared_config(argv)
                if not argv or planned != world:  # deepy.py's checks stopped it, or it plans another world size
                    note = "" if not argv else f"\ndeepy.py plans {planned} ranks, the case is registered for {world}"
                    codes = [checked.returncode or None] * world  # a refusal's status; None: nothing ran
                    self.outcomes[case.name] = Outcome(case.name, folder, codes, checked.stderr + note)
                    continue
                prepared_log[case.name] = checked.stderr
            plan.append({"name": case.name, "kind": case.kind, "argv": argv, "dir": str(folder / "case")})
            self.outcomes[case.name] = Outcome(case.name, folder, stderr=prepared_log.get(case.name, ""))
        launch_log = ""
        if plan and world == 1:
            _run_here(plan)
        elif plan:
            plan_file = self.workdir / f"plan-{world}-{len(list(self.workdir.glob('plan-*')))}.json"
            plan_file.write_text(json.dumps(plan, indent=1))
            # each case's status file tells how it ended (a rank's rare abort at exit changes nothing written)
            proc = launch(world, WORKER, str(plan_file), timeout=1200, retry_abort=False,
                          env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))})
            launch_log = f"launch exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        for item in plan:
            outcome = self.outcomes[item["name"]]
            case_dir = Path(item["dir"])
            outcome.launch_log = launch_log
            outcome.codes, logs = [], []
            for rank in range(world):
                status = case_dir / f"rank{rank}.status"
                text = status.read_text() if status.exists() else "None"
                outcome.codes.append(None if text == "None" else int(text))
                log = case_dir / f"rank{rank}.log"
                logs.append(log.read_text(errors="replace") if log.exists() else "")
            outcome.stderr = outcome.stderr + "".join(logs)


def _prepared_config(argv: list[str]) -> tuple[list[str], subprocess.CompletedProcess, int]:
    """deepy.py's checks and merged config, done here: the ranks' arguments (none if deepy.py refused or only
    printed a plan), what deepy.py said, and how many ranks it plans."""
    from helpers.inprocess import call
    from neox_llama.cli import deepy

    launches = []

    def prepare(args: list[str]) -> int:
        prepared = deepy.prepare_launch(args)
        if isinstance(prepared, int):
            return prepared
        launches.append(prepared)
        return 0

    proc = call(prepare, argv, cwd=ROOT)
    if not launches:
        return [], proc, 0
    command = launches[0].command
    threads = command.env.get("OMP_NUM_THREADS")  # the ranks' thread count, as the real launch would set it
    argv = [*command.argv[command.argv.index("--config"):], *(["--env", f"OMP_NUM_THREADS={threads}"] if threads else [])]
    return argv, proc, launches[0].world_size


def _run_here(plan: list[dict]) -> None:
    """World size 1: the cases in this process, in the session's process group."""
    from workers.cases import run_case

    from helpers.inprocess import call, session_group

    session_group()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    for item in plan:
        case_dir = Path(item["dir"])
        case_dir.mkdir(parents=True)
        proc = call(lambda argv, kind=item["kind"]: run_case(kind, argv), item["argv"], env=env, cwd=ROOT)
        (case_dir / "rank0.log").write_text(proc.stdout + proc.stderr)
        (case_dir / "rank0.status").write_text(str(proc.returncode))


def completed(outcome: Outcome) -> subprocess.CompletedProcess:
    """An outcome as a finished process (rank logs as stderr) for tests written against deepy.py's output."""
    return subprocess.CompletedProcess([], outcome.returncode, "", outcome.stderr)
