"""Kill a command with SIGKILL at randomised points while it writes.

    with TempWatch(folder) as w:                         # the reference run: how many writes
        reference_run()
    for p in kill_points(rng, n=4, window=4.2, writes=w.count):
        out = run_and_kill([sys.executable, "-m", "tools.synth", ...], p,
                           start=appears(parent, ".synth.*.staging"), watch=parent)
        assert out.killed                                # it was still running
        ...                                              # check the previous state, rerun

Two kinds of kill point, half each: ``p.delay`` seconds after ``start`` holds (stratified
over the reference run's duration: any phase, mostly between writes), or the moment the
``p.write``-th temporary file of an atomic write (``*.tmp``) or staging folder
(``*.staging``) appears under ``watch`` (in the middle of a write). Both are found by
polling the files every few milliseconds: nothing in the code under test knows about
it, no hooks. The command runs as a subprocess with its output in files.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set

ROOT = Path(__file__).resolve().parents[2]

#: kill points per target: the default test run, and the slow-marked run (make test-slow)
KILLS_DEFAULT = 2
KILLS_SLOW = 8


@dataclass
class KillOutcome:
    """What happened to one killed run."""

    delay: float            # seconds after the trigger when SIGKILL was sent (or the process ended)
    killed: bool            # the process was still running and died of SIGKILL
    triggered: bool         # the trigger fired before the process ended
    mid_write: bool         # a temporary file or staging folder existed at the kill
    returncode: int
    stdout: str
    stderr: str


def kill_seed() -> int:
    """The seed of the kill points: ``FWI_KILL_SEED`` to replay a run, else a fresh one."""
    env = os.environ.get("FWI_KILL_SEED")
    return int(env) if env else random.SystemRandom().randrange(2 ** 31)


@dataclass(frozen=True)
class KillPoint:
    """Kill ``delay`` seconds after the start trigger, or (``write`` set) when the
    ``write``-th temporary file appears."""

    delay: float = 0.0
    write: Optional[int] = None

    def __str__(self) -> str:
        return f"at write {self.write}" if self.write else f"{self.delay:.2f} s in"


def kill_points(rng: random.Random, n: int, window: float, writes: int = 0) -> List[KillPoint]:
    """``n`` kill points: half of them (all without ``writes``) delays stratified over
    ``[0, window)`` (one uniform draw in each equal slice, so a few points still cover the
    whole run), the others write numbers stratified over ``1..writes``."""
    n_write = n // 2 if writes > 0 else 0
    n_time = n - n_write
    points = [KillPoint(delay=window * (i + rng.random()) / n_time) for i in range(n_time)]
    points += [KillPoint(write=1 + int(writes * (i + rng.random()) / n_write)) for i in range(n_write)]
    return points


def _temps(folder: Path) -> Set[str]:
    """Paths of the temporary files and staging folders under ``folder`` now."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        found.update(os.path.join(dirpath, f) for f in filenames if f.endswith(".tmp"))
        found.update(os.path.join(dirpath, d) for d in dirnames if d.endswith(".staging"))
    return found


class TempWatch:
    """Count the distinct temporary files and staging folders that appear under
    ``folder`` while the block runs (a polling thread): the writes of a reference run."""

    def __init__(self, folder: Path, poll: float = 0.001):
        self.folder, self.poll = Path(folder), poll
        self.seen: Set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= _temps(self.folder)
            time.sleep(self.poll)

    @property
    def count(self) -> int:
        return len(self.seen)

    def __enter__(self) -> "TempWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def appears(folder: Path, pattern: str) -> Callable[[], bool]:
    """A trigger: true once something matching ``pattern`` exists under ``folder``."""
    folder = Path(folder)
    return lambda: folder.is_dir() and any(True for _ in folder.glob(pattern))


def writing(folder: Path) -> bool:
    """Whether an interrupted write would leave something in ``folder`` now: a ``*.tmp``
    file of an atomic write or a ``*.staging`` folder (searched recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for dirpath, dirnames, filenames in os.walk(folder):
        if any(f.endswith(".tmp") for f in filenames) or any(d.endswith(".staging") for d in dirnames):
            return True
    return False


def subprocess_env(**extra: str) -> dict:
    """The environment of a killed run: one thread (the same arithmetic as the test
    process, so results compare byte for byte), no progress bars, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FWI_PROGRESS="0", PYTHONPATH=str(ROOT), **extra)
    return env


def run_and_kill(cmd: Sequence[str], point: KillPoint, start: Optional[Callable[[], bool]] = None,
                 watch: Optional[Path] = None, cwd: Optional[Path] = None, env: Optional[dict] = None,
                 timeout: float = 300.0, poll: float = 0.001) -> KillOutcome:
    """Run ``cmd`` and SIGKILL it at ``point``: ``point.delay`` seconds after ``start()``
    first holds (or after the process start without it), or when the ``point.write``-th
    temporary file appears under ``watch``. ``watch`` is also the folder checked for a
    write in progress at the moment of the kill."""
    if point.write and watch is None:
        raise ValueError("a kill at the k-th write needs the folder to watch")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), cwd=cwd or ROOT, env=env or subprocess_env(), stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        seen: Set[str] = set()
        if point.write:
            trigger = lambda: len(seen.__ior__(_temps(watch))) >= point.write   # noqa: E731
        else:
            trigger = start
        triggered = trigger is None
        try:
            while not triggered and proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd}: the trigger did not fire within {timeout} s")
                triggered = trigger()
                if not triggered:
                    time.sleep(poll)
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < point.delay:
                time.sleep(poll)
            at = time.monotonic() - t0
            mid = writing(watch) if watch is not None and proc.poll() is None else False
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return KillOutcome(at, proc.returncode == -signal.SIGKILL, triggered, mid, proc.returncode,
                           out.read(), err.read())


def python(*args: str) -> List[str]:
    """``[sys.executable, *args]``."""
    return [sys.executable, *args]


@dataclass
class Tally:
    """Kill points tried, killed mid-run and survived, for the report line of a test."""

    target: str
    seed: int
    tried: int = 0
    killed: int = 0
    mid_write: int = 0
    survived: int = 0
    outlived: int = 0       # points the run outlived, replaced by another
    notes: str = ""

    def add(self, point: KillPoint, outcome: KillOutcome) -> None:
        self.tried += 1
        self.killed += int(outcome.killed)
        self.mid_write += int(outcome.mid_write)
        what = ("killed during a write" if outcome.mid_write else "killed") if outcome.killed else "outlived"
        self.notes += f"{'; ' if self.notes else ''}{point}: {what}"

    def line(self) -> str:
        return (f"kills[{self.target}]: {self.tried} points tried, {self.killed} killed the run "
                f"({self.mid_write} during a write), {self.survived} survived, {self.outlived} outlived and "
                f"replaced (FWI_KILL_SEED={self.seed}) [{self.notes}]")
