"""transformers 5.x: the only module that knows 5.x's private loading names.

5.x flow: from_pretrained -> _get_resolved_checkpoint_files (we note the files) -> model
built on meta -> _load_pretrained_model opens every safetensors file and passes lazy slices
to convert_and_load_state_dict_in_model (imported by name into modeling_utils, patched
there), which renames/converts keys, decides each tensor's device and dtype, and calls
core_model_loading.spawn_materialize(thread_pool, tensor, device, dtype, ...) per tensor.

We swap the lazy slices for our own sources (validated against the slices' shapes and
dtypes) and answer spawn_materialize from our engine. Every decision (target dtype, device,
renaming, MoE fusion, tying, missing keys) stays stock's.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

from fasthug_patch import capabilities, loadcall, lookahead
from fasthug_patch.adapters.base import Adapter, PatchTarget, quant_library, quant_method_of
from fasthug_patch.adapters.sources import MappedSource, check_bin_tensors
from fasthug_patch.capabilities import Facts
from fasthug_patch.engine.materialize import needs_cast, result_bytes
from fasthug_patch.entry import make_from_pretrained_wrapper
from fasthug_patch.errors import FastPathError
from fasthug_patch.thread_modes import as_made_here

# Set while stock convert_and_load runs for a fast load in this thread.
_session: contextvars.ContextVar[loadcall.LoadCall | None] = contextvars.ContextVar("fasthug_v5", default=None)


class V5Adapter(Adapter):
    name = "v5"
    dtype_kwarg = "dtype"

    def patch_targets(self) -> list[PatchTarget]:
        mu = self.modeling_utils
        core = sys.modules[mu.convert_and_load_state_dict_in_model.__module__]
        targets = [
            PatchTarget(mu.PreTrainedModel, "from_pretrained", make_from_pretrained_wrapper(self)),
            PatchTarget(mu, "_get_resolved_checkpoint_files", self._resolved_files),
            *self.dtype_targets(),
            PatchTarget(mu, "convert_and_load_state_dict_in_model", self._convert_and_load),
            PatchTarget(core, "spawn_materialize", self._spawn_materialize),
            *self.device_move_targets(),
        ]
        transform = getattr(core, "WeightTransform", None)
        if transform is not None and "materialize_tensors" in vars(transform):
            targets.append(PatchTarget(transform, "materialize_tensors", self._materialize_checked))
        return targets

    # -- wrappers ---------------------------------------------------------------
    def _subfolder(self, arguments: dict) -> str:
        return (arguments.get("download_kwargs") or {}).get("subfolder") or ""

    def _convert_and_load(self, wrapped, instance, args, kwargs):
        call = loadcall.current()
        if call is None or _session.get() is not None:
            return wrapped(*args, **kwargs)
        model, state_dict, load_config, rest = _bind_convert(*args, **kwargs)
        sources = self.admit(
            call, lambda: self._load_facts(call, model, load_config), lambda: self._sources(call, state_dict)
        )
        if sources is None:
            return wrapped(*args, **kwargs)

        call.entered_fast_internals = True
        token = _session.set(call)
        quantizer = getattr(load_config, "hf_quantizer", None)
        restore = (_quantize_in_pieces(quantizer, call.materializer.files.release_view)
                   if quantizer is not None and not quantizer.pre_quantized else None)
        call.quantizing = restore is not None
        try:
            with call.report.phase("load_weights"):
                result = wrapped(model, sources, load_config, **rest)
        finally:
            _session.reset(token)
            if restore is not None:
                restore()
        call.index.check_unchanged()  # a file replaced after its header was read: redo stock
        call.fast_loads += 1
        return result

    def _spawn_materialize(self, wrapped, instance, args, kwargs):
        call = _session.get()
        if call is None:
            return wrapped(*args, **kwargs)
        pool, tensor, device, dtype, sharding_op = _bind_spawn(*args, **kwargs)
        if sharding_op is not None:
            raise FastPathError("sharded materialisation reached the fast path")
        source = tensor.ref if isinstance(tensor, MappedSource) else tensor
        device = device if device is not None else "cpu"
        if pool is None and call.quantizing and str(device) != "cpu":
            # Quantising to a GPU: stock reads one weight at a time so that full-precision
            # copies never pile up there; the engine reads ahead, within a budget.
            if call.quantize_lookahead is None:
                call.quantize_lookahead = lookahead.Lookahead(lookahead.QUANTISE_AHEAD_BYTES)
            request = call.quantize_lookahead.add(result_bytes(source, dtype),
                                                  lambda: call.materializer.submit(source, dtype, device))
            return lambda: as_made_here(request.result())
        if pool is None and call.quantizing and needs_cast(source, dtype):
            # Stock materialises on demand while it quantises, so that full-precision copies
            # never pile up; a cast makes one, so it waits for its turn here too. (Casting
            # ahead within a budget, as 4.57's path does, measured no faster here: 1b int8 as
            # float16, 3.25 s either way over 4 alternating rounds, and 0.2 GB more at peak.)
            return lambda: as_made_here(call.materializer.submit(source, dtype, device).result())
        future = call.materializer.submit(source, dtype, device)
        # Stock returns a Future with its pool and a deferred callable without one. Its pool's
        # threads are never in inference mode, and the engine's results are made as there; the
        # deferred callable runs on the loading thread, as stock's made its tensor there.
        return future if pool is not None else lambda: as_made_here(future.result())

    def _materialize_checked(self, wrapped, instance, args, kwargs):
        """Wraps WeightTransform.materialize_tensors, which hands one mapping's tensors to
        its conversion. Where the conversion reads their bytes (a WeightConverter's
        operations, such as fusing experts, or a quantize op), our zero-copy views among
        them are checked against their files first: they were handed out unchecked, and a
        file that shrank since would be a SIGBUS in stock's torch.cat, not an error."""
        collected = wrapped(*args, **kwargs)
        call = _session.get()
        if call is not None and _reads_bytes(instance):  # one check, so one stat per file per mapping
            tensors = [tensor for group in collected.values() for tensor in group]
            call.materializer.check_views(tensors, " / ".join(collected))
        return collected

    # -- helpers ----------------------------------------------------------------
    def _load_facts(self, call, model, load_config) -> Facts:
        quantizer = getattr(load_config, "hf_quantizer", None)
        files = call.checkpoint_files or []
        return Facts(
            transformers_version=self.version,
            device_kinds=capabilities.device_kinds(getattr(load_config, "device_map", None)),
            quantization=(method := quant_method_of(quantizer)),
            quant_library=quant_library(method),
            pre_quantized=bool(getattr(quantizer, "pre_quantized", False)) if quantizer is not None else None,
            tensor_parallel=getattr(load_config, "device_mesh", None) is not None,
            weights_format=_weights_format(files),
        )

    def _sources(self, call, state_dict: dict) -> dict:
        """state_dict with every lazy slice replaced by our source for the same tensor."""
        files = call.checkpoint_files
        if not files:
            raise FastPathError("checkpoint files were not seen (weights given another way)")
        if _weights_format(files) == "bin":
            check_bin_tensors(state_dict)
            return state_dict
        with call.report.phase("plan"):
            refs = call.index.tensors(list(files))
        if refs.keys() != state_dict.keys():
            raise FastPathError("the loader's tensors differ from the checkpoint files' tensors")
        sources = {}
        for name, lazy in state_dict.items():
            ref = refs[name]
            if list(ref.shape) != list(lazy.get_shape()) or ref.dtype_name != lazy.get_dtype():
                raise FastPathError(f"{ref.file}: tensor {name!r}: header disagrees with safetensors")
            sources[name] = MappedSource(ref, call.materializer)
        call.report.files = [str(f) for f in files]
        return sources


def _quantize_in_pieces(quantizer, release_source):
    """Has the quantize ops ``quantizer`` hands out for this load run bitsandbytes' kernels
    in parallel pieces (quant.py) and unmap the checkpoint pages of what they quantised;
    returns the undo. The override sits on this load's own quantizer instance, so no other
    load sees it."""
    from fasthug_patch import quant

    stock = quantizer.get_quantize_ops
    had_own = "get_quantize_ops" in vars(quantizer)
    held = contextlib.ExitStack()
    held.enter_context(quant.quantize_pool())  # the quantize workers live as long as the load

    def get_quantize_ops():
        op = stock()
        op.convert = quant.with_chunked_kernels(op.convert, release_source)  # on the instance: the class (and its name in errors) stay stock's
        return op

    quantizer.get_quantize_ops = get_quantize_ops

    def restore():
        if had_own:
            quantizer.get_quantize_ops = stock
        else:
            del quantizer.get_quantize_ops
        held.close()

    return restore


def _reads_bytes(mapping) -> bool:
    """Whether a weight mapping's convert reads its tensors' bytes, rather than assigning
    them as they are (a plain renaming)."""
    return getattr(mapping, "quantization_operation", None) is not None or bool(getattr(mapping, "operations", None))


def _weights_format(files) -> str | None:
    if not files:
        return None
    suffixes = {str(f).rsplit(".", 1)[-1] for f in files}
    if suffixes == {"safetensors"}:
        return "safetensors"
    if suffixes <= {"bin", "pt", "pth"}:
        return "bin"
    return "+".join(sorted(suffixes))


def _bind_convert(model, state_dict, load_config, disk_offload_index=None, **extra):
    return model, state_dict, load_config, {"disk_offload_index": disk_offload_index, **extra}


def _bind_spawn(thread_pool, tensor, device=None, dtype=None, sharding_op=None, tensor_idx=None):
    return thread_pool, tensor, device, dtype, sharding_op
