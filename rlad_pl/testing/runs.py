"""Runs as the tools and tests see them: TensorBoard scalars read back from event files, and ``python -m rlad_pl fit``
run as a subprocess (exit code checked, wall time, peak memory, the run's scalars).

Reading::

    scalars = read_scalars(run_dir)                 # {tag: [(step, value), ...]}, every event file under run_dir
    last_scalars(scalars)["val/all/mean@8"]          # the last value of each tag
    timings(scalars, skip_first=1)                   # {"timing/generate": mean s, ...}, step 0 (warm-up) left out

Running::

    run = run_fit("configs/grpo_tiny.yaml", {"trainer.max_epochs": 2}, env={"OMP_NUM_THREADS": "1"})
    run.wall_s, run.peak_rss_gb, run.log_dir, run.scalars

A failed fit raises ``FitError``, whose message holds the exit status and the tail of the run's output and whose
``line`` is the CLI's one-line error. Imports nothing heavy at module level (no torch, no tensorboard): the GPU
check's driver imports it before any phase runs. Not used by training.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

#: the repository (the working directory of the fit subprocesses: configs named relative to it resolve)
REPO = Path(__file__).resolve().parents[2]
EVENT_GLOB = "events.out.tfevents.*"

PathLike = Union[str, "os.PathLike[str]"]
#: ``tag -> [(step, value), ...]`` in step order (``wall_time=True``: ``(step, wall_time, value)``)
Scalars = dict[str, list[tuple]]


# ------------------------------------------------------------------------------------------------ reading
def event_files(logdir: PathLike) -> list[Path]:
    """Every TensorBoard event file under ``logdir`` (recursive: all versions, all sub-runs), in name order."""
    return sorted(Path(logdir).rglob(EVENT_GLOB))


def event_accumulators(logdir: PathLike, *, tensors: bool = False) -> list:
    """One loaded ``EventAccumulator`` per event file under ``logdir`` (every scalar kept; ``tensors``: every tensor
    too, e.g. text summaries and the custom-scalars layout)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, **({"tensors": 0} if tensors else {})}
    accs = []
    for f in event_files(logdir):
        ea = EventAccumulator(str(f), size_guidance=guidance)
        ea.Reload()
        accs.append(ea)
    return accs


def read_scalars(logdir: PathLike, *, wall_time: bool = False) -> Scalars:
    """Every scalar tag of the event files under ``logdir``: ``tag -> [(step, value), ...]`` sorted by step (a stable
    sort: points logged at the same step keep the order they were written in, files taken in name order).
    ``wall_time=True`` gives ``(step, wall_time, value)`` triples. No event file: ``{}``."""
    out: Scalars = {}
    for ea in event_accumulators(logdir):
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.wall_time, e.value) if wall_time else (e.step, e.value)
                                           for e in ea.Scalars(tag))
    return {tag: sorted(points, key=lambda p: p[0]) for tag, points in out.items()}


def values(scalars: Scalars, tag: str) -> list[float]:
    """The values of one tag in step order (``[]`` when it was not logged)."""
    return [p[-1] for p in scalars.get(tag, [])]


def last_scalars(scalars: Scalars) -> dict[str, float]:
    """The last (highest-step) value of every tag."""
    return {tag: points[-1][-1] for tag, points in scalars.items() if points}


def scalar_means(scalars: Scalars, tags: Optional[Sequence[str]] = None, *, skip_first: int = 0,
                 default: float = 0.0) -> dict[str, float]:
    """Mean value of each tag (default: every tag) over its points at steps ``>= skip_first`` (steps count from 0:
    ``skip_first=1`` leaves out step 0, the warm-up that carries imports, model loading and engine starts);
    ``default`` for a tag with no such point (not logged by this run)."""
    out = {}
    for tag in scalars if tags is None else tags:
        vals = [p[-1] for p in scalars.get(tag, []) if p[0] >= skip_first]
        out[tag] = statistics.fmean(vals) if vals else default
    return out


def timings(scalars: Scalars, *, skip_first: int = 0) -> dict[str, float]:
    """The mean of every ``timing/*`` tag (seconds per step of each phase), as ``scalar_means``."""
    return scalar_means(scalars, [t for t in scalars if t.startswith("timing/")], skip_first=skip_first)


def median_step_s(times: Sequence[float], warmup: int = 1) -> float:
    """Median seconds of one step from per-step end times (wall-clock stamps taken when each step finished): the
    differences ``times[i] - times[i-1]`` for ``i >= warmup``, i.e. the durations of steps ``warmup ..`` (step 0 and
    the rest of the warm-up, whose time holds the start-up, left out)."""
    if warmup < 1 or len(times) <= warmup:
        raise ValueError(f"median_step_s: need more than warmup={warmup} (>= 1) step times, got {len(times)}")
    return statistics.median(b - a for a, b in zip(times[warmup - 1:], times[warmup:]))


def version_dirs(root: PathLike) -> list[Path]:
    """``root/lightning_logs/version_N`` folders in the order of ``N`` (the last is the newest run)."""
    found = [p for p in Path(root).glob("lightning_logs/version_*") if re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


# ------------------------------------------------------------------------------------------------ running
def override_args(overrides: Union[Mapping[str, Any], Sequence[str], None]) -> list[str]:
    """``{"trainer.max_epochs": 2, "export.enabled": False}`` -> ``["--trainer.max_epochs", "2", "--export.enabled",
    "false"]`` (booleans lower-case, None as ``null``, lists and dicts as JSON); a list of strings passes as is."""
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        return [str(a) for a in overrides]
    argv = []
    for key, v in overrides.items():
        text = ("true" if v else "false") if isinstance(v, bool) else "null" if v is None else (
            json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v))
        argv += [f"--{key}", text]
    return argv


def fit_argv(configs: Union[PathLike, Sequence[PathLike]], overrides: Union[Mapping[str, Any], Sequence[str],
             None] = None, extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``python -m rlad_pl``: ``fit``, ``--config C`` for each config, the overrides, then ``extra``
    (given last, so they win)."""
    configs = [configs] if isinstance(configs, (str, os.PathLike)) else list(configs)
    argv = ["fit"]
    for c in configs:
        argv += ["--config", str(c)]
    return argv + override_args(overrides) + [str(a) for a in extra]


def fit_command(configs, overrides=None, extra: Sequence[str] = ()) -> list[str]:
    """``python -m rlad_pl fit ...`` as a subprocess command (this interpreter)."""
    return [sys.executable, "-m", "rlad_pl", *fit_argv(configs, overrides, extra)]


@dataclass
class Finished:
    """A finished (or killed) subprocess of ``run_logged``."""

    command: list[str]
    returncode: Optional[int]  # None when it was killed for running past its timeout
    wall_s: float
    peak_rss_gb: float  # the process's resident-set high-water mark (``wait4``), GiB
    log: Path  # its stdout and stderr
    timed_out: bool = False

    def tail(self, n: int = 15) -> list[str]:
        return log_tail(self.log, n)


def log_tail(log: PathLike, n: int = 15) -> list[str]:
    """The last ``n`` non-empty lines of a log file (``[]`` when it does not exist)."""
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


def run_logged(cmd: Sequence[str], log: PathLike, *, env: Optional[Mapping[str, str]] = None,
               cwd: PathLike = REPO, timeout: Optional[float] = None, append: bool = False,
               header: Optional[str] = None, new_session: bool = False) -> Finished:
    """Run ``cmd`` with stdout and stderr into ``log`` (``append``: after what it holds, below ``header``); ``env``
    is added to this process's environment. Past ``timeout`` seconds the process is killed (``new_session``: it
    runs in its own session and its whole process group is killed, children included). Measures the wall time and
    the peak resident set of the process (``os.wait4``)."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log.open("a" if append else "w") as fh:
        if header:
            fh.write(header.rstrip("\n") + "\n")
            fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=new_session)
        killed = threading.Event()

        def kill():
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                if new_session:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted (Ctrl-C): do not leave the child running
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        proc.returncode = rc = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    wall = time.perf_counter() - t0
    timed_out = killed.is_set()
    return Finished(list(cmd), None if timed_out else rc, wall, usage.ru_maxrss / 2 ** 20, log, timed_out)


class FitError(RuntimeError):
    """``python -m rlad_pl fit`` failed: its exit status (None: killed at the timeout), the last lines of its output
    (``tail``) and the CLI's one-line error (``line``: the ``rlad_pl: error:`` line, else the last line)."""

    def __init__(self, returncode: Optional[int], tail: list[str], log: Path, timeout: Optional[float] = None):
        self.returncode, self.tail, self.log = returncode, tail, log
        errors = [ln for ln in tail if ln.startswith("rlad_pl: error:")]
        self.line = errors[-1] if errors else (tail[-1] if tail else "(no output)")
        why = f"ran past {timeout:.0f} s" if returncode is None else f"exited {returncode}"
        super().__init__(f"python -m rlad_pl fit {why} (log {log}):\n" + "\n".join(tail))


@dataclass
class FitRun:
    """A finished ``python -m rlad_pl fit``: where it wrote, how long it took, what it logged."""

    command: list[str]
    root: Path  # trainer.default_root_dir (removed after reading when run_fit made it)
    log_dir: Optional[Path]  # the newest lightning_logs/version_N under root (None: no logger)
    log: Path  # the subprocess's stdout and stderr
    wall_s: float  # the whole subprocess, start-up included
    peak_rss_gb: float  # its resident-set high-water mark
    events: Scalars = field(repr=False)  # tag -> [(step, wall_time, value)]

    @property
    def scalars(self) -> Scalars:
        """``tag -> [(step, value)]`` (as ``read_scalars``)."""
        return {tag: [(s, v) for s, _, v in points] for tag, points in self.events.items()}

    def timings(self, skip_first: int = 0) -> dict[str, float]:
        return timings(self.scalars, skip_first=skip_first)


def run_fit(configs: Union[PathLike, Mapping, Sequence[Union[PathLike, Mapping]]],
            overrides: Union[Mapping[str, Any], Sequence[str], None] = None, root: Optional[PathLike] = None, *,
            extra: Sequence[str] = (), env: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
            log: Optional[PathLike] = None, on_start: Optional[Callable[[list[str]], None]] = None) -> FitRun:
    """Run ``python -m rlad_pl fit`` as a subprocess (working directory: the repository) and read back its scalars.

    ``configs``: config files, or dicts (config overlays, written as JSON into the run folder), given in order as
    ``--config``; then ``--trainer.default_root_dir ROOT``, the ``overrides`` and ``extra``. ``root``: the run
    folder; None makes a temporary one that is removed once the scalars are read. ``env`` is added to this
    process's environment (plus ``TOKENIZERS_PARALLELISM=false`` unless set); stdout and stderr go to ``log``
    (default ``ROOT/fit.log``); ``on_start`` gets the command before it runs. A non-zero exit or a run past
    ``timeout`` seconds raises ``FitError``."""
    made = root is None
    root = Path(tempfile.mkdtemp(prefix="rlad_fit_")) if made else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        files = []
        items = [configs] if isinstance(configs, (str, os.PathLike, Mapping)) else list(configs)
        for i, c in enumerate(items):
            if isinstance(c, Mapping):
                path = root / f"overlay{i}.yaml"
                path.write_text(json.dumps(c))
                c = path
            files.append(c)
        cmd = fit_command(files, ["--trainer.default_root_dir", str(root), *override_args(overrides)], extra)
        if on_start:
            on_start(cmd)
        log = Path(log) if log else root / "fit.log"
        done = run_logged(cmd, log, env={"TOKENIZERS_PARALLELISM": "false", **(env or {})}, timeout=timeout)
        if done.returncode != 0:
            raise FitError(done.returncode, done.tail(), log, timeout)
        versions = version_dirs(root)
        return FitRun(cmd, root, versions[-1] if versions else None, log, done.wall_s, done.peak_rss_gb,
                      read_scalars(root, wall_time=True))
    finally:
        if made:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ in process
class _StderrTail:
    """A stderr that passes everything through and keeps the last non-empty line (the CLI's one-line error)."""

    def __init__(self):
        self.stream, self.last = sys.stderr, ""

    def write(self, text: str) -> int:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            self.last = lines[-1][:400]
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def cli_in_process(argv: Sequence[str]) -> tuple[int, str]:
    """Call the entry point of ``python -m rlad_pl`` (``rlad_pl.cli.main``) in this process (no second torch /
    transformers import); returns its exit status and the last line it wrote to stderr (its one-line error)."""
    from rlad_pl.cli import main

    rc, errors = 0, _StderrTail()
    try:
        with contextlib.redirect_stderr(errors):
            main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc, errors.last


# ------------------------------------------------------------------------------------------------ results
def write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (a temporary file renamed into place: a reader never sees half)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def package_versions(dists: Sequence[str]) -> dict[str, Optional[str]]:
    """Installed version of each distribution (None when missing), from package metadata (nothing imported)."""
    import importlib.metadata as md

    out: dict[str, Optional[str]] = {}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
