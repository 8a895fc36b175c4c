"""Settings the plugin cannot use: FASTHUG_* values it would ignore and FASTHUG_* names it
does not read.

settings.py reads each variable leniently (a value it cannot use counts as unset), which
used to be silent: ``FASTHUG_IO=odirect`` loaded exactly as ``auto``, ``FASTHUG_THREAD=4``
(no S) changed nothing, and neither said so. Each such setting is now a warning, once per
process, when the plugin is imported, and ``fasthug-patch env`` lists them with the value
every setting has. Kept free of heavy imports, like settings.py.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

from fasthug_patch import settings as s

PREFIX = "FASTHUG_"

# FASTHUG_* variables read by the command-line tools, the test scripts and the matrix, not by
# the plugin: known names, not settings.
TOOL_VARS = frozenset({
    "FASTHUG_CACHE",  # bench/demo checkpoint cache (bench/checkpoints.py)
    "FASTHUG_DEMO_SIZE",  # the demo's checkpoint size (tests)
    "FASTHUG_CEILING_THREADS",  # bench ceilings' cold-read thread counts
    "FASTHUG_MATRIX_RECORD",  # scripts/matrix.py -> tests/test_sweep.py
    "FASTHUG_TEST_LINES",  # scripts/run_tests.sh
    "FASTHUG_SUBSET_LINES",  # scripts/run_tests.sh
})

_FLAG_WORDS = "1/true/yes/on or 0/false/no/off"


def _flag(unset: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if s.flag_word(value) is not None:
            return None
        return f"is not {_FLAG_WORDS}; counted as unset ({unset})"

    return check


def _whole(default: str, minimum: int | None = 1) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            number = int(value.strip())
        except ValueError:
            return f"is not a whole number; using {default}"
        if minimum is not None and number < minimum:
            return f"is below {minimum}; using {minimum}"
        return None

    return check


def _seconds(default: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            number = float(value.strip())
        except ValueError:
            return f"is not a number of seconds; using {default}"
        return "is negative; using 0" if number < 0 else None

    return check


def _io_mode(value: str) -> str | None:
    if value.strip().lower() in s.IO_MODES:
        return None
    return f"is not one of {', '.join(s.IO_MODES)}; using auto"


def _ring(value: str) -> str | None:
    slots, mib = s.DEFAULT_RING
    counts = s.ring_counts(value)
    if counts is None:
        return f"is not SLOTSxMIB (e.g. 8x64); using the default ring, {slots}x{mib}"
    return "has a number below 1; using 1 for it" if min(counts) < 1 else None


def _any(value: str) -> str | None:
    return None


# name -> check of a set, non-empty value: None if the plugin uses it as given, else what is
# wrong with it and what the plugin does instead (settings.py's readers, in words).
CHECKS: dict[str, Callable[[str], str | None]] = {
    s.ENABLE_VAR: _flag("importing fasthug_patch turns it on; the startup hook leaves it off"),
    s.THREADS_VAR: _whole(f"the default, {s.DEFAULT_THREADS}"),
    s.CHUNK_MB_VAR: _whole(f"the default, {s.DEFAULT_CHUNK_MB} MiB"),
    s.CAST_THREADS_VAR: _whole(f"the default, the CPU count ({os.cpu_count() or 1})"),
    s.POPULATE_VAR: _flag("auto"),
    s.ALLOW_UNTESTED_VAR: _flag("off"),
    s.IO_VAR: _io_mode,
    s.MEMORY_VAR: _whole("the memory the machine reports available", minimum=None),
    s.RING_VAR: _ring,
    s.PIN_FILES_VAR: _flag("off"),
    s.PIN_CHUNK_VAR: _whole(f"the default, {s.DEFAULT_PIN_CHUNK_MB} MiB"),
    s.STREAM_TO_DEVICE_VAR: _flag("on"),
    s.HUGE_PAGES_VAR: _flag("off"),
    s.CAST_AHEAD_VAR: _flag("on"),
    s.DIST_VAR: _flag("on: ranks share the reading"),
    s.DIST_TIMEOUT_VAR: _seconds(f"the default, {s.DEFAULT_DIST_TIMEOUT_S:g} s"),
    s.DIST_HOST_VAR: _any,
    s.UNVERIFIED_GPU_VAR: _flag("off"),
}


def problems(environ=None) -> list[str]:
    """One line for each FASTHUG_* variable in ``environ`` (default os.environ) that the
    plugin cannot use as given, sorted by name."""
    environ = os.environ if environ is None else environ
    found = []
    for name in sorted(n for n in environ if n.startswith(PREFIX)):
        value = environ[name]
        check = CHECKS.get(name)
        if check is not None:
            trouble = check(value) if value.strip() else None  # empty counts as unset, as intended
            if trouble:
                found.append(f"{name}={value!r} {trouble}")
        elif name not in TOOL_VARS:
            import difflib  # only here: the import itself runs this scan

            # Matched without the prefix, which every name shares.
            close = difflib.get_close_matches(name[len(PREFIX):], [n[len(PREFIX):] for n in CHECKS], n=1)
            hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
            found.append(f"{name} is not a setting fasthug_patch reads{hint}; ignored")
    return found


_warned: set[str] = set()


def warn_once() -> None:
    """Warn about each problem once per process (the plugin's import calls this)."""
    for line in problems():
        if line not in _warned:
            _warned.add(line)
            warnings.warn(f"fasthug_patch: {line}", UserWarning, stacklevel=3)
