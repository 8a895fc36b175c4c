"""transformers 4.43-4.49 (and 4.50's default path): the only module that knows their
private loading names.

Flow on these lines: from_pretrained -> _load_pretrained_model, which for every shard calls
``load_state_dict(shard_file)`` (module-level in modeling_utils, looked up by name), then
either copies the tensors into the already-built model (``low_cpu_mem_usage=False``, the
default: ``_load_state_dict_into_model`` / ``model.load_state_dict``, assigning them
outright when the dtypes match) or hands them to ``_load_state_dict_into_meta_model``
(``low_cpu_mem_usage=True`` or a device map). Either way, the tensors come from
``load_state_dict``, which for safetensors is ``safe_load_file``: one thread reading
every byte into fresh memory.

We answer ``load_state_dict`` for safetensors shards with the engine: zero-copy views of
the file's mapping, made resident by the reader threads, in the order stock returns them
(sorted names, as ``safe_open.keys()``). What stock does with them (rename, copy or
assign, cast, tie, initialise missing keys) is unchanged. Stock's explicit
``gc.collect()`` after every shard is skipped during a fast load: it frees nothing the
load still holds and takes a fifth of a second per shard once transformers is imported.
"""

from __future__ import annotations

from fasthug_patch import loadcall
from fasthug_patch.adapters.base import Adapter, PatchTarget, env_true
from fasthug_patch.capabilities import Facts
from fasthug_patch.entry import make_from_pretrained_wrapper
from fasthug_patch.errors import FastPathError
from fasthug_patch.thread_modes import as_made_here

# safetensors metadata "format" values stock accepts (anything else: stock's own OSError)
_KNOWN_FORMATS = ("pt", "tf", "flax", "mlx")


class V4LegacyAdapter(Adapter):
    name = "v4_legacy"
    dtype_kwarg = "torch_dtype"

    def patch_targets(self) -> list[PatchTarget]:
        mu = self.modeling_utils
        return [
            PatchTarget(mu.PreTrainedModel, "from_pretrained", make_from_pretrained_wrapper(self)),
            PatchTarget(mu, "load_state_dict", self._load_state_dict),
            # modeling_utils calls gc.collect() through its own module global "gc"
            PatchTarget(mu.gc, "collect", _skip_collect_during_fast_load),
            *self.device_move_targets(),
        ]

    def _parallel_shard_env(self) -> bool:
        return env_true("HF_ENABLE_PARALLEL_LOADING")

    # -- wrappers ---------------------------------------------------------------
    def _load_state_dict(self, wrapped, instance, args, kwargs):
        call = loadcall.current()
        if call is None:
            return wrapped(*args, **kwargs)
        file, is_quantized, map_location = _bind_load_state_dict(*args, **kwargs)
        if str(map_location) == "meta":
            return wrapped(*args, **kwargs)  # shapes only
        if not (isinstance(file, str) and file.endswith(".safetensors")):
            call.declined("stock loads .bin shards with torch.load(mmap=True) on this transformers line")
            return wrapped(*args, **kwargs)
        facts = Facts(transformers_version=self.version, weights_format="safetensors",
                      quantization="quantized" if is_quantized else None)
        plan = self.admit(call, lambda: facts, lambda: _sorted_refs(call, file))
        if plan is None:
            return wrapped(*args, **kwargs)

        call.entered_fast_internals = True
        with call.report.phase("load_weights"):
            futures = [(name, call.materializer.submit(ref, ref.torch_dtype(), "cpu")) for name, ref in plan]
            # as stock's safe_load_file made them, on this thread
            state_dict = {name: as_made_here(future.result()) for name, future in futures}
        call.index.check_unchanged([file])  # replaced after its header was read: redo stock
        call.fast_loads += 1
        return state_dict


def _sorted_refs(call, file: str):
    """(name, TensorRef) in stock's order; FastPathError where stock would raise or differ."""
    with call.report.phase("plan"):
        header = call.index.add_file(file)
    if header.metadata.get("format") not in _KNOWN_FORMATS:
        raise FastPathError(f"{file}: safetensors metadata names no known format; stock reads it")
    call.prefetch([file])
    call.report.files.append(file)
    return sorted(header.tensors.items())


def _skip_collect_during_fast_load(wrapped, instance, args, kwargs):
    if loadcall.current() is not None and not args and not kwargs:
        return 0
    return wrapped(*args, **kwargs)


def _bind_load_state_dict(checkpoint_file, is_quantized=False, map_location=None, weights_only=True):
    return checkpoint_file, is_quantized, map_location
