"""transformers 4.50-4.57: the only module that knows these lines' private loading names.

4.57 flow (4.51-4.56 alike, with extra arguments; 4.50 the same when low_cpu_mem_usage
or a device map is given, else the 4.49 path, answered as in v4_legacy):
from_pretrained -> _load_pretrained_model -> load_shard_file per shard, which builds a state dict (meta tensors for safetensors, torch.load'ed tensors for .bin) and
calls _load_state_dict_into_meta_model. That function, per tensor: reads the slice, asks
_infer_parameter_dtype for the target dtype, casts, makes it contiguous, moves it to its
device and assigns it with _load_parameter_into_model.

For the cases the capability table admits (CPU targets, and on 4.57 CUDA ones; no mesh, no
FSDP rank juggling; no quantizer but bitsandbytes on 4.57, pre-quantised or quantised on the
fly) we do the same per-tensor steps with stock's own helpers for the dtype and the
assignment (the quantizer's create_quantized_param for quantised tensors, its kernels run in
pieces when it quantises), but materialise the shard's tensors in parallel through the
engine first, each on the device and cast where stock would. Anything else calls the stock
function unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re

from fasthug_patch import capabilities, loadcall, lookahead, quant
from fasthug_patch.adapters.base import PatchTarget, quant_library, quant_method_of
from fasthug_patch.adapters.sources import check_bin_tensors
from fasthug_patch.adapters.v4_legacy import V4LegacyAdapter
from fasthug_patch.capabilities import Facts, version_tuple
from fasthug_patch.engine.materialize import needs_cast, result_bytes
from fasthug_patch.entry import make_from_pretrained_wrapper
from fasthug_patch.errors import FastPathError
from fasthug_patch.thread_modes import as_made_here


class V4Adapter(V4LegacyAdapter):
    name = "v4"

    def patch_targets(self) -> list[PatchTarget]:
        mu = self.modeling_utils
        targets = [
            PatchTarget(mu.PreTrainedModel, "from_pretrained", make_from_pretrained_wrapper(self)),
            PatchTarget(mu, "_get_resolved_checkpoint_files", self._resolved_files),
            *self.dtype_targets(),
            PatchTarget(mu, "_load_state_dict_into_meta_model", self._load_into_meta_model),
            *self.device_move_targets(),
        ]
        if version_tuple(self.version) < (4, 51):  # 4.50's default path still reads whole state dicts
            targets.append(PatchTarget(mu, "load_state_dict", self._load_state_dict))
        return targets

    def _load_into_meta_model(self, wrapped, instance, args, kwargs):
        call = loadcall.current()
        if call is None:
            return wrapped(*args, **kwargs)
        shard = _bind(wrapped, args, kwargs)
        plan = self.admit(call, lambda: self._load_facts(shard), lambda: self._plan(call, shard))
        if plan is None:
            return wrapped(*args, **kwargs)

        call.entered_fast_internals = True
        with call.report.phase("load_weights"):
            self._load_shard(call, shard, plan)
        call.index.check_unchanged([shard["shard_file"]])  # replaced after its header was read: redo stock
        call.fast_loads += 1
        if "cpu_offload_index" in shard:  # 4.50-4.56 return both offload indexes
            return shard["disk_offload_index"], shard["cpu_offload_index"]
        return shard["disk_offload_index"]

    # -- helpers ----------------------------------------------------------------
    def _load_facts(self, shard) -> Facts:
        quantizer = shard["hf_quantizer"]
        device_map = shard["device_map"]
        return Facts(
            transformers_version=self.version,
            device_kinds=capabilities.device_kinds(device_map),
            quantization=(method := quant_method_of(quantizer)),
            quant_library=quant_library(method),
            # known here; a quantizer that does not say is taken as quantising on the fly (stock)
            pre_quantized=bool(getattr(quantizer, "pre_quantized", False)) if quantizer is not None else None,
            tensor_parallel=shard["device_mesh"] is not None,
            fsdp_low_mem=self._fsdp_low_mem(),
            weights_format="safetensors" if shard["shard_file"].endswith(".safetensors") else "bin",
        )

    def _plan(self, call, shard) -> list[tuple[str, object]]:
        """(parameter name, source) per tensor, checked against what stock would read."""
        state_dict = shard["state_dict"]
        if shard.get("cpu_offload_index") is not None:
            raise FastPathError("offload_state_dict stages weights through a temporary folder; stock does that")
        expected = shard.get("expected_keys")  # 4.50-4.56 load only the keys the model expects
        if expected is not None:
            expected = set(expected)
            state_dict = {k: v for k, v in state_dict.items() if k in expected}
        if not shard["shard_file"].endswith(".safetensors"):
            check_bin_tensors(state_dict)
            return list(state_dict.items())
        with call.report.phase("plan"):
            refs = call.index.tensors([shard["shard_file"]])
        call.report.files.append(shard["shard_file"])
        plan = []
        renaming = shard["reverse_renaming_mapping"]
        for name, empty in state_dict.items():
            ref = refs.get(renaming.get(name, name))
            if ref is None or tuple(empty.shape) != ref.shape or empty.dtype != ref.torch_dtype():
                raise FastPathError(f"{shard['shard_file']}: tensor {name!r} differs from the loader's view")
            plan.append((name, ref))
        return plan

    def _load_shard(self, call, shard, plan) -> None:
        quantizer = shard["hf_quantizer"]
        on_the_fly = quantizer is not None and not quantizer.pre_quantized
        # The quantize workers, held for the shard so every weight's kernel pieces share them.
        workers = quant.quantize_pool() if on_the_fly else contextlib.nullcontext()
        with _submodules_memoised(shard["model"]), workers:
            pending = self._submit_shard(call, shard, plan, on_the_fly)
            if quantizer is not None:  # it reads the quant-state views now: is their file still whole?
                call.index.check_unchanged([shard["shard_file"]])
            with _serializable_answered_once(quantizer):
                self._place_shard(call, shard, pending, on_the_fly)

    def _submit_shard(self, call, shard, plan, on_the_fly: bool) -> list:
        """(name, quantised, future) per tensor: each asked of the engine on the device,
        and as the dtype, stock's loop would give it."""
        mu = self.modeling_utils
        model, state_dict, quantizer = shard["model"], shard["state_dict"], shard["hf_quantizer"]
        device_map = shard["device_map"]
        engine = call.materializer
        reads_on = stock_tensor_device(device_map)
        on_device = str(reads_on) != "cpu"  # stock reads and casts on the GPU, then places
        keep_fp32 = shard.get("keep_in_fp32_regex", shard.get("keep_in_fp32_modules"))
        ahead = lookahead.Lookahead(lookahead.QUANTISE_AHEAD_BYTES) if on_the_fly else None
        pending = []
        for name, source in plan:
            _, dtype = mu._infer_parameter_dtype(model, name, state_dict[name], keep_fp32, quantizer)
            quantised = quantizer is not None and quantizer.param_needs_quantization(model, name)
            # A quantised tensor is handed to the quantizer where stock reads it; any other
            # goes to its module's device, which stock moves it to after the cast.
            target = reads_on if quantised else _param_device(device_map, name)
            if on_device and str(target) == "cpu":
                raise FastPathError(f"{name}: stock reads it on {reads_on} and moves it back to the CPU")
            submit = functools.partial(engine.submit, source, dtype, target, stock_casts_on_device=on_device)
            if quantised and on_the_fly and (on_device or needs_cast(source, dtype)):
                # A full-precision copy that the quantizer only reads (cast: 4.57 quantises
                # from float16 by default; or read onto the GPU): made a little ahead of its
                # turn, so that reading and casting overlap quantising while such copies stay
                # within lookahead.QUANTISE_AHEAD_BYTES, on the GPU too.
                pending.append((name, quantised, ahead.add(result_bytes(source, dtype), submit)))
            else:
                pending.append((name, quantised, submit()))
        return pending

    def _place_shard(self, call, shard, pending, on_the_fly: bool) -> None:
        """Each tensor into the model as stock's loop places it: the quantizer's own
        create_quantized_param for quantised ones, stock's assignment for the rest."""
        model, state_dict, quantizer = shard["model"], shard["state_dict"], shard["hf_quantizer"]
        device_map = shard["device_map"]
        drop_bin = not shard["shard_file"].endswith(".safetensors") and "expected_keys" not in shard
        unready = []
        for name, quantised, future in pending:
            if quantised and on_the_fly:
                # Quantised as stock does it (the quantizer's own code), its bitsandbytes
                # kernel run in parallel pieces (quant.py); then the checkpoint pages it was
                # read from leave the process, unless the parameter kept them.
                value = _taken(future)
                with quant.chunked_kernels():
                    quantizer.create_quantized_param(model, value, name, _param_device(device_map, name))
                quant.release_unless_kept(value, _placed(model, name, value), call.materializer.files.release_view)
            elif quantised:
                # A pre-quantised tensor: the quantizer places it, in stock's order, from the
                # tensor as read.
                quantizer.create_quantized_param(model, _taken(future), name, _param_device(device_map, name))
            elif future.done():
                self._assign(model, name, _taken(future))
            else:
                # Still being cast (or copied to its device): assigned after the rest, in their
                # own order, so the quantised tensors are placed meanwhile (in 4.57's order
                # lm_head and the embeddings, the largest casts, come first). Each assignment
                # sets one parameter of its own module, so the order changes nothing else.
                unready.append((name, future))
                continue
            if drop_bin:  # as 4.57's stock: drop the loaded entry so its memory can go
                del state_dict[name]
        for name, future in unready:
            self._assign(model, name, _taken(future))
            if drop_bin:
                del state_dict[name]

    def _assign(self, model, name: str, tensor) -> None:
        mu = self.modeling_utils
        if hasattr(mu, "_load_parameter_into_model"):  # 4.51+
            mu._load_parameter_into_model(model, name, tensor)
            return
        module, param_type = mu.get_module_from_name(model, name)  # 4.50's inline form
        module.load_state_dict({param_type: tensor}, strict=False, assign=True)


def _taken(future):
    """A materialised tensor as stock's loop makes it: on this thread (an inference tensor
    inside torch.inference_mode())."""
    return as_made_here(future.result())


def _placed(model, name: str, value):
    """What the quantizer set for ``name``; ``value`` itself where nothing is found there,
    so that its source is kept, to be safe."""
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(model.get_submodule(module_name), attribute)
    except AttributeError:
        return value


@contextlib.contextmanager
def _submodules_memoised(model):
    """Stock's per-tensor helpers (_infer_parameter_dtype, get_module_from_name,
    _load_parameter_into_model, the quantizer's) each find a tensor's module with
    ``model.get_submodule``, a walk from the root: three or four walks per tensor, a tenth
    of a warm pre-quantised 1B load. While one shard is placed no module is added or
    replaced (tensors are), so each path's answer is kept for the shard, on this model
    instance alone; lookups that fail are not kept and fail as before."""
    if "get_submodule" in vars(model):  # someone's own override: leave it be
        yield
        return
    walk = model.get_submodule  # the class's method, bound
    found: dict[str, object] = {}

    def get_submodule(target: str):
        module = found.get(target)
        if module is None:
            module = found[target] = walk(target)
        return module

    object.__setattr__(model, "get_submodule", get_submodule)
    try:
        yield
    finally:
        vars(model).pop("get_submodule", None)


@contextlib.contextmanager
def _serializable_answered_once(quantizer):
    """4.57's 8-bit create_quantized_param asks ``quantizer.is_serializable()`` for every
    tensor, and each answer reads bitsandbytes' installed metadata from disk: 0.4 s of a
    0.7 s pre-quantised 1B int8 load on the reference VM. The answer cannot change within a
    load, so it is asked once and a True is given back from then on (an instance attribute,
    removed after; this quantizer belongs to this call alone). A False is left to stock,
    which warns each time it answers."""
    method = getattr(quantizer, "is_serializable", None)
    if method is None or "is_serializable" in vars(quantizer) or method() is not True:
        yield
        return
    quantizer.is_serializable = _always_true
    try:
        yield
    finally:
        vars(quantizer).pop("is_serializable", None)


def _always_true(*args, **kwargs) -> bool:
    return True


def _param_device(device_map, name: str):
    """The device stock's loop places ``name`` on (and hands the quantizer): the device
    map's entry for the longest module prefix of the name (its regex, sorted the same
    way), "cpu" without one."""
    if device_map is None:
        return "cpu"
    match = _module_pattern(tuple(device_map)).search(name)
    if match is None:
        raise FastPathError(f"{name} has no device in the device map")
    return device_map[match.group()]


@functools.lru_cache(maxsize=8)
def _module_pattern(modules: tuple) -> re.Pattern:
    """Stock's regex over a device map's module names (asked once per tensor, built once)."""
    return re.compile("|".join(re.escape(k) for k in sorted(modules, reverse=True)))


def stock_tensor_device(device_map):
    """Where 4.57's shard loop reads a shard's tensors, and so casts them: the device given
    for the whole model ("" in the device map) when it is not the CPU, as safe_open's
    device. A torch.device without an index gives None there, which safe_open reads as
    the CPU: device_map="cuda" casts on the CPU and "cuda:0" on the GPU. Mirrors stock's
    lines; tests/test_v4_devices.py checks it against the device stock opens the file on."""
    import torch

    whole = device_map.get("") if device_map is not None else None
    if whole is None or whole in ("cpu", torch.device("cpu")):
        return "cpu"
    reads_on = whole.index if isinstance(whole, torch.device) else whole
    return "cpu" if reads_on is None else reads_on


def _bind(wrapped, args, kwargs) -> dict:
    """The shard call's arguments by name, defaults filled in, whatever this line's
    signature (4.50-4.56 pass expected_keys, cpu offload and is_safetensors as well)."""
    bound = _signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@functools.lru_cache(maxsize=4)
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)
