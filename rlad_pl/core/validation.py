"""Small pure checks for constructor arguments: each returns the value or raises ``ConfigError(field, message)``
naming the field and what was expected, so bad input fails in one line before any compute is spent."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from rlad_pl.core.errors import ConfigError


def check_int(field: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    """An integer ``>= minimum`` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, f"expected an integer >= {minimum}, got {value!r}{hint}")
    return value


def check_float(field: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A finite number in ``[low, high]`` (``(low`` / ``high)`` when ``low_open`` / ``high_open``); None bounds are
    unbounded."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(field, f"expected {describe_range(low, high, low_open, high_open)}, got {value!r}{hint}")
    return float(value)


def describe_range(low: Optional[float], high: Optional[float], low_open: bool = False,
                   high_open: bool = False) -> str:
    """``a finite number in (0, 1]``, ``a finite number > 0``, ``a finite number``."""
    if low is not None and high is not None:
        return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(field, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_writable(folder: str | os.PathLike, field: str) -> None:
    """Raise ``ConfigError(field, ...)`` unless a file can be created in ``folder`` (or, when it does not exist yet,
    in its nearest existing ancestor, so that nothing is created here). A real probe file, not ``os.access``: root
    ignores permission bits, and a read-only or full file system only shows on a write."""
    path = Path(folder).absolute()
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(field, f"cannot create folder {path}: {probe_dir} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".rlad_pl_write_probe_", dir=probe_dir)
        os.close(fd)
        os.remove(name)
    except OSError as e:
        where = path if probe_dir == path else f"{path} (in {probe_dir})"
        raise ConfigError(field, f"cannot write to folder {where}: {e.strerror or e}") from None
