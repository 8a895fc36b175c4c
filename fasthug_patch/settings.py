"""Environment variables that steer the plugin, read in one place.

Kept free of heavy imports: this module is loaded by the ``.pth`` startup hook.
"""

from __future__ import annotations

import os

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

ENABLE_VAR = "FASTHUG_ENABLE"
THREADS_VAR = "FASTHUG_THREADS"
CHUNK_MB_VAR = "FASTHUG_CHUNK_MB"
POPULATE_VAR = "FASTHUG_POPULATE"
ALLOW_UNTESTED_VAR = "FASTHUG_ALLOW_UNTESTED"


def env_flag(name: str) -> bool | None:
    """True / False for a recognised word, None when unset or unrecognised."""
    value = os.environ.get(name)
    if value is None:
        return None
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return max(minimum, int(value))
    except ValueError:
        return default


def reader_threads() -> int:
    """Threads that materialise tensors. Two per core measured best on the 2-core
    reference machine (faults on fresh memory and page-cache reads overlap)."""
    return env_int(THREADS_VAR, max(2, min(16, 2 * (os.cpu_count() or 1))))


def chunk_bytes() -> int:
    """Largest piece of one tensor a thread casts or prefaults at a time."""
    return env_int(CHUNK_MB_VAR, 16) << 20


def populate_mapped() -> bool:
    """Prefault zero-copy tensors before returning, so 'loaded' means resident."""
    flag = env_flag(POPULATE_VAR)
    return True if flag is None else flag


def allow_untested_versions() -> bool:
    return bool(env_flag(ALLOW_UNTESTED_VAR))
