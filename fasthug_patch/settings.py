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
CAST_THREADS_VAR = "FASTHUG_CAST_THREADS"
POPULATE_VAR = "FASTHUG_POPULATE"
ALLOW_UNTESTED_VAR = "FASTHUG_ALLOW_UNTESTED"
IO_VAR = "FASTHUG_IO"
MEMORY_VAR = "FASTHUG_MEMORY_AVAILABLE_MB"
RING_VAR = "FASTHUG_RING"
PIN_FILES_VAR = "FASTHUG_PIN_FILES"
PIN_CHUNK_VAR = "FASTHUG_PIN_CHUNK_MB"
STREAM_TO_DEVICE_VAR = "FASTHUG_STREAM_TO_DEVICE"
HUGE_PAGES_VAR = "FASTHUG_HUGE_PAGES"
CAST_AHEAD_VAR = "FASTHUG_CAST_AHEAD"
DIST_VAR = "FASTHUG_DIST"
DIST_TIMEOUT_VAR = "FASTHUG_DIST_TIMEOUT_S"
DIST_HOST_VAR = "FASTHUG_DIST_HOST"
UNVERIFIED_GPU_VAR = "FASTHUG_UNVERIFIED_GPU"

# Pinned staging ring per device: slots x MiB. Enough slots for every reader thread to
# have one filling while the copy engine drains the others.
DEFAULT_RING = (16, 32)
# Defaults of the numeric settings (their readers below say why these values).
DEFAULT_THREADS = 16
DEFAULT_CHUNK_MB = 16
DEFAULT_PIN_CHUNK_MB = 256
DEFAULT_DIST_TIMEOUT_S = 600.0

IO_MODES = ("auto", "mmap", "read", "direct")


def flag_word(value: str | None) -> bool | None:
    """True / False for a recognised word, None for None or an unrecognised one."""
    word = (value or "").strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def env_flag(name: str) -> bool | None:
    """True / False for a recognised word, None when unset or unrecognised."""
    return flag_word(os.environ.get(name))


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return max(minimum, int(value))
    except ValueError:
        return default


def reader_threads() -> int:
    """Threads that read and materialise tensors. Sixteen measured best on the 2-core
    reference machine with a network disk (cold reads need the queue depth; warm loads
    lost nothing to the extra threads). See bench/io_strategies.py and docs/design.md."""
    return env_int(THREADS_VAR, DEFAULT_THREADS)


def cast_threads() -> int:
    """Threads of the cast pool (at most reader_threads()). Casting is CPU work: more threads
    than cores only interleave page faults (on the 2-core reference VM a 1B fp32 -> bf16
    cast took 0.64-0.68 s median with 2-4 at once against 0.79 s with 16), and idle ones
    still take turns at the GIL with the loading thread."""
    return env_int(CAST_THREADS_VAR, os.cpu_count() or 1)


def chunk_bytes() -> int:
    """Largest piece of one tensor a thread casts or prefaults at a time."""
    return env_int(CHUNK_MB_VAR, DEFAULT_CHUNK_MB) << 20


def populate_mapped() -> bool | None:
    """Prefault zero-copy tensors: True every one before it is handed out, False never (they
    map on first use), None (the default) where it pays. There a page-cached file's views
    are mapped ahead on the cast threads while stock builds the model (Materializer.
    map_ahead), and a cold file's only where prefaulting is how it gets read (FASTHUG_IO=
    mmap); a filled file's views map on first use, because prefaulting each piece as its
    bytes arrived made cold loads slower. docs/design.md has the measurements."""
    return env_flag(POPULATE_VAR)


def io_mode() -> str:
    """How checkpoint files are read: "auto" (per file, from its page-cache residency),
    "mmap" (always through the mapping), "read" (always fill the page cache with
    parallel preadv first) or "direct" (as auto, but a cold file is read with O_DIRECT
    into fresh tensors, past the page cache: less CPU per byte, and the next load of the
    file is cold again; engine/direct.py)."""
    value = os.environ.get(IO_VAR, "").strip().lower()
    return value if value in IO_MODES else "auto"


def memory_available_override() -> int | None:
    """FASTHUG_MEMORY_AVAILABLE_MB, in bytes: pretend the machine has this much free
    memory (tests use it to simulate a small machine)."""
    value = os.environ.get(MEMORY_VAR, "").strip()
    try:
        return int(value) << 20 if value else None
    except ValueError:
        return None


def allow_untested_versions() -> bool:
    return bool(env_flag(ALLOW_UNTESTED_VAR))


def unverified_gpu_paths() -> bool:
    """Whether the GPU paths written and tested with the CPU stand-in device, but not yet
    run on a GPU, may be taken (FASTHUG_UNVERIFIED_GPU=1; capabilities.UNVERIFIED_GPU
    lists them). Off by default: "the same model as stock" is claimed only for what was
    checked on the hardware. The GPU scripts turn it on to check them."""
    return env_flag(UNVERIFIED_GPU_VAR) is True


def ring_shape() -> tuple[int, int]:
    """FASTHUG_RING="SLOTSxMIB" (e.g. "8x64"): the staging ring's slots and slot size in
    bytes; malformed or unset gives the default, 16 x 32 MiB."""
    counts = ring_counts(os.environ.get(RING_VAR, ""))
    slots, mib = (max(1, counts[0]), max(1, counts[1])) if counts else DEFAULT_RING
    return slots, mib << 20


def ring_counts(value: str) -> tuple[int, int] | None:
    """The two whole numbers of "SLOTSxMIB" as written (not yet raised to 1), or None."""
    left, cross, right = value.strip().lower().partition("x")
    try:
        return (int(left), int(right)) if cross else None
    except ValueError:
        return None


def stream_model_moves() -> bool:
    """Whether model.cuda() / model.to("cuda") on a fast-loaded model streams through the
    ring (default on; FASTHUG_STREAM_TO_DEVICE=0 leaves those calls to torch)."""
    return env_flag(STREAM_TO_DEVICE_VAR) is not False


def pin_cached_files() -> bool:
    """Whether a page-cached checkpoint file bound for a GPU is pinned in place and DMA'd
    from (cudaHostRegister) instead of copied through the staging ring. Off unless
    FASTHUG_PIN_FILES=1: on an H100, 7b bf16 to ready in 0.91 s against 1.02 s through the
    ring (stock 2.06-2.19 s), within the runs' spread, and the whole-model GPU tests have
    not yet run with it on (docs/gpu.md)."""
    return env_flag(PIN_FILES_VAR) is True


def pin_chunk_bytes() -> int:
    """FASTHUG_PIN_CHUNK_MB: a pinned file is registered in chunks of this many MiB, on
    several reader threads at once, each tensor's DMA waiting only for its own chunks
    (default 256)."""
    return max(1, env_int(PIN_CHUNK_VAR, DEFAULT_PIN_CHUNK_MB)) << 20


def huge_pages() -> bool:
    """Whether weights the engine writes on the CPU (casts) go into transparent huge pages.
    Off unless FASTHUG_HUGE_PAGES=1: a win where fresh memory is cheap to back, a loss on
    VMs whose balloon reports free memory to the host (engine/host_memory.py)."""
    return env_flag(HUGE_PAGES_VAR) is True


def cast_ahead() -> bool:
    """Whether casts start while stock still builds the model, to the dtype it is built in
    (default on; FASTHUG_CAST_AHEAD=0 starts each cast when the loader asks for it).
    fasthug_patch/cast_ahead.py says which tensors and why."""
    return env_flag(CAST_AHEAD_VAR) is not False


def dist_sharing() -> bool | None:
    """FASTHUG_DIST=0: ranks of a multi-process job each read the whole checkpoint instead
    of sharing the reading (ranks.py)."""
    return env_flag(DIST_VAR)


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, "").strip() or default))
    except ValueError:
        return default


def dist_timeout_seconds() -> float:
    """How long a rank waits for a chunk another rank claimed to be read before raising."""
    return _env_seconds(DIST_TIMEOUT_VAR, DEFAULT_DIST_TIMEOUT_S)


def dist_host(default: str) -> str:
    """FASTHUG_DIST_HOST: the host name ranks group by when they share the reading (default
    the machine's own): only ranks with the same one share. Set it alike for ranks that see
    one page cache under different host names (a container each on one machine)."""
    return os.environ.get(DIST_HOST_VAR, "").strip() or default
