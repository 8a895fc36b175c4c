"""Which checkpoint tensors to start casting, or mapping, before the model exists.

Stock settles the dtype the model is built in (``_get_dtype``) just before it builds the
model on the meta device; the loader asks for each tensor as some dtype only afterwards.
On a warm cast load the casts are most of the work (a 1B fp32 -> bf16 load: about 0.8 s of
casting after about 0.1 s of building), and while stock builds, the casters sit idle.
So the engine starts the casts that stock will most likely ask for, to the dtype just
settled, and hands a result over only when the loader asks for that tensor as that dtype
(engine ``Materializer.cast_ahead``): a wrong guess costs time and memory, never a
different model.

A guess is only made where it is usually right:
- every weight stays on the CPU (a GPU target casts on the GPU). An automatic map
  (``device_map="auto"``, ...) counts as the CPU where it surely resolves there
  (``resolve_device_map``);
- the dtype is one torch.dtype, not a per-submodule dict;
- no quantising on the fly (its weights are quantised, not cast); a checkpoint that
  bitsandbytes saved quantised is fine, its float tensors are cast like any other;
- not a module the class keeps in fp32 (``_keep_in_fp32_modules``, stock's pattern);
- floating tensors of at least ``MIN_BYTES``, stored in another dtype.

Under the same conditions the tensors the loader will take as they are stored (``views``)
have their pages mapped into the process ahead (engine ``Materializer.map_ahead``), so the
user's first forward pass does not fault them in one at a time.
"""

from __future__ import annotations

import re

from fasthug_patch import capabilities

# Smaller tensors are a rounding error of the cast time and cost a Future each.
MIN_BYTES = 1 << 20
# device_map="auto" (or "balanced", ...) with no accelerator: accelerate puts every weight on
# the CPU when the model fits in the memory it finds available, and offloads to disk when it
# does not. Guessing "the CPU" needs the weights to take at most this share of the available
# memory, so a guess is never the allocation that leaves a machine short.
AUTO_CPU_SHARE = 0.5
# Tensor names that only a checkpoint saved quantised by bitsandbytes holds.
_BNB_SAVED = re.compile(r"\.SCB$|\.quant_state\.bitsandbytes__|\.weight_format$")


def guess(refs, dtype, device_map, config, model_class) -> list:
    """The TensorRefs among ``refs`` (name -> TensorRef) to cast to ``dtype`` ahead of the
    loader, in file order; empty where no guess is safe enough to be worth it."""
    if not _worth_guessing(refs, dtype, device_map, config):
        return []
    kept = _kept_in_fp32(model_class)
    chosen = [
        ref for name, ref in refs.items()
        if ref.nbytes >= MIN_BYTES and ref.torch_dtype().is_floating_point and ref.itemsize > 1
        and ref.torch_dtype() != dtype and not (kept and kept.search(name))
    ]
    return sorted(chosen, key=lambda ref: (ref.file, ref.offset))


def views(refs, dtype, device_map, config, model_class) -> list:
    """The TensorRefs among ``refs`` that the loader will most likely take as they are
    stored (zero-copy views of the mapped file), in file order: those ``guess`` does not
    cast and whose stored dtype is the one they end up in. Same conditions as ``guess``.
    A wrong guess maps pages nobody reads; it never changes the model."""
    import torch

    if not _worth_guessing(refs, dtype, device_map, config):
        return []
    kept = _kept_in_fp32(model_class)

    def final_dtype(name, stored):
        if not stored.is_floating_point:
            return stored
        return torch.float32 if kept and kept.search(name) else dtype

    chosen = [ref for name, ref in refs.items()
              if ref.nbytes and final_dtype(name, ref.torch_dtype()) == ref.torch_dtype()]
    return sorted(chosen, key=lambda ref: (ref.file, ref.offset))


def resolve_device_map(device_map, max_memory, refs, dtype):
    """``device_map`` as the guesses see it: "cpu" for an automatic map ("auto", "balanced",
    ...) that will surely put every weight on the CPU: no accelerator, no ``max_memory``
    (which can send weights to disk), and the weights (``refs``, name -> TensorRef, at
    ``dtype``) within AUTO_CPU_SHARE of the available memory. Otherwise as given."""
    import torch

    if not isinstance(device_map, str) or capabilities.device_kinds(device_map) != frozenset({"auto"}):
        return device_map
    if max_memory is not None or _accelerator_present():
        return device_map
    from fasthug_patch.engine.residency import available_memory_bytes

    available = available_memory_bytes()
    if not available:
        return device_map
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 0
    # A floating tensor ends up in ``dtype`` or stays as stored (fp32 modules): the larger.
    need = sum(max(ref.nbytes, ref.nbytes // ref.itemsize * itemsize) if ref.torch_dtype().is_floating_point
               else ref.nbytes for ref in refs.values())
    return "cpu" if need <= AUTO_CPU_SHARE * available else device_map


def _worth_guessing(refs, dtype, device_map, config) -> bool:
    """Whether this load is one where the loader's dtypes can be told before it runs:
    one floating dtype, every weight on the CPU, no quantising on the fly."""
    import torch

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return False
    if capabilities.device_kinds(device_map) != frozenset({"cpu"}):
        return False
    if getattr(config, "quantization_config", None) is not None:
        # Without a device map bitsandbytes picks an accelerator where there is one.
        if not any(map(_BNB_SAVED.search, refs)) or (device_map is None and _accelerator_present()):
            return False
    return True


def _accelerator_present() -> bool:
    """Whether torch has a usable accelerator (CUDA, XPU, ...); True where it cannot say.
    Usable, not built in: PyPI's default torch is a CUDA build, whose current_accelerator()
    names CUDA on a machine with no GPU, where stock's automatic map puts every weight on
    the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not hasattr(accelerator, "is_available"):
        return True
    try:
        return bool(accelerator.is_available())
    except Exception:  # noqa: BLE001 - a guess: assume one
        return True


def _kept_in_fp32(model_class):
    """Stock's pattern for the class's fp32 modules (``(^|\\.)module($|\\.)``), or None."""
    modules = [*(getattr(model_class, "_keep_in_fp32_modules", None) or ()),
               *(getattr(model_class, "_keep_in_fp32_modules_strict", None) or ())]
    if not modules:
        return None
    return re.compile("|".join(rf"((^|\.){module}($|\.))" for module in modules))
