"""Subprocess checks that run beside the rest of the suite.

Some tests run a script in a fresh process (the 8-device sharding check, the benchmarks'
smoke runs): a minute or more each, during which the test process waits. The suite's own
work is mostly single-threaded (tracing, compiling small programs), so on the 2-core CI
machine one core is idle most of the time. A module declares such processes as `Job`s in
a module-level ``BACKGROUND`` dict; ``tests/conftest.py`` moves that module's tests to the
end of the run and starts its jobs when collection is done, one at a time on a worker
thread; the tests then take each job's `Finished` result with `result` (which runs the
job on the spot when it was not started, e.g. when the module is run on its own). Under
pytest-xdist (the test command runs two workers) nothing is started ahead: a job runs
when its test needs it, while the other worker goes on with its own files.
"""

from __future__ import annotations

import atexit
import dataclasses
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Job:
    """A process to run: ``argv`` after the Python executable; ``"{out}"`` in an argument
    is replaced by a fresh directory of the job's own. ``needed_by``: patterns of the
    names (``item.name``) of the tests that read it, or of a fixture they use: the job
    starts only when one of them is selected."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timeout: float = 900
    needed_by: tuple[str, ...] = ("*",)


@dataclasses.dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    out: Path  # the job's own directory ("{out}")
    seconds: float  # wall time of the process


_lock = threading.Lock()
_results: dict[str, Finished | BaseException] = {}
_done: dict[str, threading.Event] = {}
_running: list[subprocess.Popen] = []
_directories: list[Path] = []  # the jobs' own, read by the tests until the run ends


def _run(job: Job) -> Finished:
    out = Path(tempfile.mkdtemp(prefix="gemmalens-background-"))
    with _lock:
        _directories.append(out)
    env = {**os.environ, **job.env}
    argv = [sys.executable, *(arg.replace("{out}", str(out)) for arg in job.argv)]
    start = time.monotonic()
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with _lock:
        _running.append(process)
    try:
        stdout, stderr = process.communicate(timeout=job.timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n[background] killed after {job.timeout} s"
    finally:
        with _lock:
            _running.remove(process)
    return Finished(process.returncode, stdout, stderr, out, time.monotonic() - start)


def _worker(jobs: list[tuple[str, Job]]) -> None:
    for name, job in jobs:
        try:
            _results[name] = _run(job)
        except BaseException as error:  # handed to the test that reads the result
            _results[name] = error
        _done[name].set()


def schedule(jobs: list[tuple[str, Job]]) -> None:
    """Starts ``(name, job)`` pairs one after another on a worker thread."""
    jobs = [(name, job) for name, job in jobs if name not in _done]
    for name, _ in jobs:
        _done[name] = threading.Event()
    if jobs:
        threading.Thread(target=_worker, args=(jobs,), daemon=True).start()


def result(name: str, job: Job) -> Finished:
    """The finished job ``name``: waits for it when it was started, else runs it now."""
    if name not in _done:
        _done[name] = threading.Event()
        _worker([(name, job)])
    _done[name].wait()
    outcome = _results[name]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def needed(jobs: Mapping[str, Job], test_names: list[str]) -> list[tuple[str, Job]]:
    """The jobs that one of ``test_names`` (names of selected tests and of the fixtures
    they use) reads."""
    return [
        (name, job)
        for name, job in jobs.items()
        # Exact names first: a parametrised test's name holds brackets, which fnmatch
        # reads as a character class.
        if any(
            test == p or fnmatch.fnmatchcase(test, p) for test in test_names for p in job.needed_by
        )
    ]


@atexit.register
def _stop_running() -> None:
    with _lock:
        for process in _running:
            process.kill()
        for process in _running:
            process.wait()
        for directory in _directories:
            shutil.rmtree(directory, ignore_errors=True)
