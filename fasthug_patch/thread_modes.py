"""The calling thread's tensor modes: what stock's tensors inherit and the engine must not.

Two of torch's settings for new tensors are thread-local, and serving code sets both
around ``from_pretrained``:

- ``torch.inference_mode()``: a tensor made on a thread inside it is an *inference tensor*
  (``is_inference()``): no version counter, no in-place update outside the mode, so a model
  of them cannot be trained. Which weights stock hands out as inference tensors therefore
  follows the thread that made them: 4.x makes every tensor on the loading thread (all
  inference tensors when it is in the mode); 5.x's loader thread pool makes plain ones,
  and its synchronous loading (quantising on the fly, HF_DEACTIVATE_ASYNC_LOAD) inference
  ones again.
- a default device (``with torch.device("cuda"):``, ``torch.set_default_device``): factory
  calls that name no device allocate there. Stock turns it into ``device_map={"": device}``
  and names devices explicitly from then on.

The engine's entry points (``engine_entry``) run with both switched off, so that what they
allocate is plain (their reader threads, never in the mode, write into it) and on the CPU
unless they name another device. Where stock would have made a tensor on the current
thread, the adapters hand it over through ``as_made_here``: the same memory, as an
inference tensor exactly when this thread is in the mode. No byte is copied either way.
"""

from __future__ import annotations

import contextlib
import functools

from fasthug_patch.errors import FastPathError


def user_torch_modes() -> tuple[str, ...]:
    """The torch function and dispatch modes active on this thread, by class name, other
    than a default device (which the engine handles). Stock runs its loading ops under them
    (every one on 4.x; 5.x's conversions and synchronous loads); the engine's threads, where
    no mode is active, would not: a mode that changes what an op makes would make another
    model. So a load under one goes to stock (the capability table's torch-modes rule)."""
    import torch

    if not (torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()):
        return ()
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        modes = [m for m in _get_current_function_mode_stack() if not isinstance(m, DeviceContext)]
        modes += list(_get_current_dispatch_mode_stack())
    except Exception:  # noqa: BLE001 - torch moved its private helpers: a mode of some kind is active
        return ("an unidentified torch mode",)
    return tuple(type(mode).__name__ for mode in modes)


def callers_modes_off():
    """Context: tensors made inside are plain ones, on the CPU unless a device is named,
    whatever the calling thread set (views of an inference tensor stay inference tensors:
    ``as_made_here`` mends those)."""
    import torch

    in_mode = torch.is_inference_mode_enabled()
    device_set = torch._C._len_torch_function_stack() > 0 and torch.get_default_device().type != "cpu"
    if not (in_mode or device_set):
        return contextlib.nullcontext()  # the common case, at two cheap checks per call
    modes = contextlib.ExitStack()
    if in_mode:
        modes.enter_context(torch.inference_mode(False))
    if device_set:
        modes.enter_context(torch.device("cpu"))
    return modes


def engine_entry(method):
    """Decorates the engine's entry points: every tensor they make (and every mapping whose
    views they hand out) is plain and on the CPU unless they name a device."""

    @functools.wraps(method)
    def entry(*args, **kwargs):
        with callers_modes_off():
            return method(*args, **kwargs)

    return entry


def as_made_here(tensor):
    """``tensor`` as stock's tensor would be had stock made it on this thread now: an
    inference tensor inside torch.inference_mode(), a plain one outside it; an alias of the
    same memory where ``tensor`` is of the other kind. Anything but a tensor as it is."""
    import torch

    wanted = torch.is_inference_mode_enabled()
    if not isinstance(tensor, torch.Tensor) or tensor.is_inference() == wanted:
        return tensor
    if type(tensor) is not torch.Tensor:  # an alias would drop the subclass: let stock load it
        raise FastPathError(f"a {type(tensor).__name__} is not handed over as an inference tensor")
    with torch.inference_mode(wanted):
        # set_ on a new empty tensor of the wanted kind: same storage, offset, shape and
        # strides; the storage (and an mmap behind it) lives as long as either tensor.
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
