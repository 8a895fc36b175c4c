"""``fasthug-patch env``: what this installation is, for a bug report or a "why is my load
not fast" question. Versions and what the capability table makes of them, whether the
startup hook is installed, the machine, and the value every setting has, with the
settings the plugin cannot use (settings_check.py)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from fasthug_patch import capabilities, settings, settings_check

PTH_NAME = "fasthug_patch.pth"

# Shown for a setting left unset: what the plugin does then, in the README's words.
DEFAULTS = {
    settings.ENABLE_VAR: "unset: importing turns the plugin on, the startup hook does not",
    settings.THREADS_VAR: str(settings.DEFAULT_THREADS),
    settings.CHUNK_MB_VAR: str(settings.DEFAULT_CHUNK_MB),
    settings.CAST_THREADS_VAR: f"the CPU count, {os.cpu_count() or 1}",
    settings.POPULATE_VAR: "auto",
    settings.ALLOW_UNTESTED_VAR: "0",
    settings.IO_VAR: "auto",
    settings.MEMORY_VAR: "MemAvailable",
    settings.RING_VAR: "x".join(map(str, settings.DEFAULT_RING)),
    settings.PIN_FILES_VAR: "0",
    settings.PIN_CHUNK_VAR: str(settings.DEFAULT_PIN_CHUNK_MB),
    settings.STREAM_TO_DEVICE_VAR: "1",
    settings.HUGE_PAGES_VAR: "0",
    settings.CAST_AHEAD_VAR: "1",
    settings.DIST_VAR: "1",
    settings.DIST_TIMEOUT_VAR: f"{settings.DEFAULT_DIST_TIMEOUT_S:g}",
    settings.DIST_HOST_VAR: "this machine's host name",
    settings.UNVERIFIED_GPU_VAR: "0",
}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def transformers_status(version: str | None) -> str:
    """What the capability table does with this transformers release, in one line."""
    if version is None:
        return "not installed"
    line = capabilities.adapter_line(version)
    if line is None:
        return f"{version}: no adapter for this line (the plugin supports {capabilities.tested_span()}): every load is stock's"
    if capabilities.version_tuple(version) in capabilities.TESTED:
        return f"{version}: adapter {line}, a tested line"
    if settings.allow_untested_versions():
        return f"{version}: adapter {line}, an untested line, tried because FASTHUG_ALLOW_UNTESTED is on"
    return f"{version}: adapter {line}, an untested line: loads go to stock unless FASTHUG_ALLOW_UNTESTED=1"


def bitsandbytes_status(version: str | None) -> str:
    if version is None:
        return "not installed (quantised loads are stock's, which need it anyway)"
    from fasthug_patch import quant

    if quant.bnb_verified(version):
        return f"{version}, checked by the parity tests"
    return f"{version}, not checked by the parity tests ({quant.verified_span()} are): its loads are stock's"


def startup_hook() -> str:
    """Where the .pth hook that FASTHUG_ENABLE=1 needs is installed, if anywhere."""
    for directory in sys.path:
        candidate = os.path.join(directory or ".", PTH_NAME)
        if os.path.isfile(candidate):
            return f"installed ({candidate})"
    return "not found on sys.path: FASTHUG_ENABLE=1 does nothing without `import fasthug_patch` (reinstall the package)"


def _huge_pages() -> str:
    from fasthug_patch.engine import host_memory

    return host_memory.thp_mode() or "unknown"


def _memory_available() -> str:
    from fasthug_patch.engine import residency

    available = residency.available_memory_bytes()
    return f"{available / 1e9:.1f} GB available" if available else "available memory unknown"


def _gpus() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none visible to torch"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)}: {', '.join(names)} (CUDA {torch.version.cuda})"


def lines() -> list[str]:
    out = [
        f"fasthug_patch {_version('fasthug_patch') or 'not installed (run from a checkout)'}"
        f" at {os.path.dirname(os.path.abspath(__file__))}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {_version('torch')}",
        f"transformers {transformers_status(_version('transformers'))}",
        f"safetensors {_version('safetensors')}, accelerate {_version('accelerate')}, wrapt {_version('wrapt')}",
        f"bitsandbytes {bitsandbytes_status(_version('bitsandbytes'))}",
        f"startup hook: {startup_hook()}",
        f"machine: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, {_memory_available()}, "
        f"transparent huge pages: {_huge_pages()}, GPUs: {_gpus()}",
        "settings (unset shows the default):",
    ]
    width = max(map(len, DEFAULTS))
    for name, default in DEFAULTS.items():
        value = os.environ.get(name, "")
        shown = f"{value!r}" if value.strip() else f"- ({default})"
        out.append(f"  {name:<{width}}  {shown}")
    found = settings_check.problems()
    out.append("settings the plugin cannot use:" + ("" if found else " none"))
    out.extend(f"  {line}" for line in found)
    return out

