"""Turning the patch on and off: process-wide switch, scoped overrides, wrapper install.

Semantics (documented in README):
- ``enable()`` / ``disable()`` set the process-wide switch that every thread sees.
- ``enabled()`` / ``disabled()`` override it for the current thread (and asyncio task)
  only, through a context variable; they nest, and the innermost wins. Other threads keep
  seeing the process-wide switch. New threads start from the process-wide switch.
- The wrappers are installed while anything can want the fast path (the switch is on, or
  an ``enabled()`` scope is open anywhere) and removed exactly otherwise, so after
  ``disable()`` transformers' functions are the original objects again.
- Whether a call takes the fast path is decided when the call starts: a load that began
  under the fast path finishes under it even if another thread disables meanwhile.

Nothing here imports torch or transformers: installation waits for
``transformers.modeling_utils`` to be imported (a wrapt post-import hook).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from typing import Iterator

from fasthug_patch import settings

_TARGET_MODULE = "transformers.modeling_utils"

_lock = threading.RLock()
_switch_on = False
_open_enabled_scopes = 0
_hook_registered = False
_installed_patch = None  # adapters.InstalledPatch while wrappers are in place
_scope: contextvars.ContextVar[bool | None] = contextvars.ContextVar("fasthug_scope", default=None)


def is_enabled() -> bool:
    """Whether a from_pretrained call made now, in this thread, would try the fast path."""
    scoped = _scope.get()
    return _switch_on if scoped is None else scoped


def enable() -> None:
    """Turn the fast path on for the whole process. Idempotent."""
    global _switch_on
    with _lock:
        _switch_on = True
        _want_wrappers()


def disable() -> None:
    """Turn the fast path off for the whole process and restore transformers' originals
    (unless an ``enabled()`` scope is still open in some thread)."""
    global _switch_on
    with _lock:
        _switch_on = False
        _drop_wrappers_if_unwanted()


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Fast path on for loads made in this thread inside the block."""
    global _open_enabled_scopes
    with _lock:
        _open_enabled_scopes += 1
        _want_wrappers()
    token = _scope.set(True)
    try:
        yield
    finally:
        _scope.reset(token)
        with _lock:
            _open_enabled_scopes -= 1
            _drop_wrappers_if_unwanted()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Stock loading for loads made in this thread inside the block."""
    token = _scope.set(False)
    try:
        yield
    finally:
        _scope.reset(token)


def enable_from_import() -> None:
    """``import fasthug_patch`` turns the patch on unless FASTHUG_ENABLE says no."""
    if settings.env_flag(settings.ENABLE_VAR) is not False:
        enable()


def enable_from_environment() -> None:
    """The ``.pth`` hook: on only when FASTHUG_ENABLE holds a true word."""
    if settings.env_flag(settings.ENABLE_VAR):
        enable()


def installed_patch():
    """The live InstalledPatch, or None (for tests and diagnostics)."""
    return _installed_patch


def _want_wrappers() -> None:
    global _hook_registered
    if _installed_patch is not None:
        return
    module = sys.modules.get(_TARGET_MODULE)
    if module is not None and not _is_partially_imported(module):
        _install(module)
    elif not _hook_registered:
        import wrapt  # light, and only paid once something asks for the patch

        wrapt.register_post_import_hook(_on_target_imported, _TARGET_MODULE)
        _hook_registered = True


def _is_partially_imported(module) -> bool:
    # During transformers' own import the module can be in sys.modules half-built; the
    # post-import hook fires once it is complete.
    return not hasattr(module, "PreTrainedModel")


def _on_target_imported(module) -> None:
    with _lock:
        if (_switch_on or _open_enabled_scopes) and _installed_patch is None:
            _install(module)


def _install(modeling_utils) -> None:
    global _installed_patch
    from fasthug_patch import adapters

    _installed_patch = adapters.install(modeling_utils)


def _drop_wrappers_if_unwanted() -> None:
    global _installed_patch
    if _switch_on or _open_enabled_scopes or _installed_patch is None:
        return
    _installed_patch.remove()
    _installed_patch = None
