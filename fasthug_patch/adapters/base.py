"""What every adapter shares: the wrap/unwrap mechanics and the facts read from a call."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import wrapt

from fasthug_patch import capabilities, device_move, loadcall, thread_modes
from fasthug_patch.capabilities import Facts
from fasthug_patch.errors import CheckpointPathError, FastPathError


@dataclass
class PatchTarget:
    owner: object  # module or class
    attribute: str
    wrapper: object  # wrapt-style wrapper(wrapped, instance, args, kwargs)


class InstalledPatch:
    """The wrappers in place; ``remove()`` puts back the exact original objects."""

    def __init__(self, adapter, targets: list[PatchTarget]) -> None:
        self.adapter = adapter
        self._originals: list[tuple[object, str, object]] = []
        try:
            for target in targets:
                original = _raw_attribute(target.owner, target.attribute)
                wrapt.wrap_function_wrapper(target.owner, target.attribute, target.wrapper)
                self._originals.append((target.owner, target.attribute, original))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        while self._originals:
            owner, attribute, original = self._originals.pop()
            setattr(owner, attribute, original)

    @property
    def wrapped_names(self) -> list[str]:
        return [f"{getattr(o, '__name__', o)}.{a}" for o, a, _ in self._originals]


def _raw_attribute(owner, attribute):
    # For a class, take the descriptor itself (the classmethod object), not the bound method.
    if isinstance(owner, type):
        return owner.__dict__[attribute]
    return getattr(owner, attribute)


class Adapter:
    """One transformers line. Subclasses name that line's private functions."""

    name = "base"
    dtype_kwarg = "dtype"

    def __init__(self, transformers_module, modeling_utils) -> None:
        self.transformers = transformers_module
        self.modeling_utils = modeling_utils
        self.version = transformers_module.__version__

    def patch_targets(self) -> list[PatchTarget]:
        raise NotImplementedError

    def device_move_targets(self) -> list[PatchTarget]:
        """model.cuda() / .to("cuda") of a fast-loaded model stream through the ring (every line
        defines both on PreTrainedModel)."""
        cls = self.modeling_utils.PreTrainedModel
        return [PatchTarget(cls, name, wrapper) for name, wrapper in
                (("cuda", device_move.cuda_wrapper), ("to", device_move.to_wrapper)) if name in cls.__dict__]

    def admit(self, call, facts, prepare):
        """The load-stage decision. Returns what ``prepare()`` built for the fast path, or
        None after recording on ``call`` why the stock internals run instead."""
        try:
            decision = capabilities.decide(facts(), "load")
            prepared = prepare() if decision.fast else None
        except FastPathError as exc:
            decision, prepared = capabilities.Decision(False, str(exc), "sources"), None
        if prepared is None:
            call.declined(decision.reason)
        return prepared

    # -- the checkpoint's files ------------------------------------------------
    def _resolved_files(self, wrapped, instance, args, kwargs):
        """Wraps modeling_utils._get_resolved_checkpoint_files (same name and result,
        ``(checkpoint_files, sharded_metadata)``, on both lines): refuses weight files
        outside the checkpoint directory, and notes the files for the fast path."""
        result = wrapped(*args, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2):
            return result
        files, sharded_metadata = result
        if loadcall.paths_guarded():
            where = inspect.signature(wrapped).bind_partial(*args, **kwargs).arguments
            check_checkpoint_paths(files, sharded_metadata, where.get("pretrained_model_name_or_path"),
                                   self._subfolder(where))
        call = loadcall.current()
        if call is not None:
            call.checkpoint_files = files  # the same list stock later extends
            call.prefetch(files)  # overlaps stock's model construction
        return result

    def dtype_targets(self) -> list[PatchTarget]:
        """modeling_utils._get_dtype, where this line has it (4.57, 5.x)."""
        mu = self.modeling_utils
        return [PatchTarget(mu, "_get_dtype", self._dtype_settled)] if hasattr(mu, "_get_dtype") else []

    def _dtype_settled(self, wrapped, instance, args, kwargs):
        """Wraps modeling_utils._get_dtype, which settles the dtype the model is about to
        be built in (the second item of its result on both lines; None on 4.x means
        torch's default, which the model is then built in): casts to it start now, while
        stock builds the model (cast_ahead.py)."""
        result = wrapped(*args, **kwargs)
        call = loadcall.current()
        if call is None or not (isinstance(result, tuple) and len(result) >= 2):
            return result
        asked = inspect.signature(wrapped).bind_partial(*args, **kwargs).arguments.get("dtype")
        if not isinstance(asked, dict):  # per-submodule dtypes: no single guess
            import torch

            call.cast_ahead(result[1] if result[1] is not None else torch.get_default_dtype(), result[0])
        return result

    def _subfolder(self, arguments: dict) -> str:
        return arguments.get("subfolder") or ""

    # -- facts about a from_pretrained call ------------------------------------
    def call_facts(self, cls, args, kwargs) -> Facts:
        quant = kwargs.get("quantization_config")
        config = kwargs.get("config")
        config_quant = getattr(config, "quantization_config", None) if config is not None else None
        return Facts(
            transformers_version=self.version,
            model_class=getattr(cls, "__name__", str(cls)),
            model_module=getattr(cls, "__module__", "") or "",
            device_kinds=capabilities.device_kinds(kwargs.get("device_map")),
            quantization=(method := _quant_method(quant) or _quant_method(config_quant)),
            quant_library=quant_library(method),
            # Auto classes pass the loaded config: a quantization_config in it means the
            # checkpoint was saved quantised. Without a config it is known at the load stage.
            pre_quantized=(config_quant is not None) if config is not None else None,
            tensor_parallel=any(kwargs.get(k) is not None for k in ("tp_plan", "tp_size", "device_mesh"))
            or kwargs.get("distributed_config") is not None,
            deepspeed_zero3=self._deepspeed_zero3(),
            fsdp_low_mem=self._fsdp_low_mem(),
            gguf=bool(kwargs.get("gguf_file")),
            foreign_format="tf" if kwargs.get("from_tf") else "flax" if kwargs.get("from_flax") else None,
            state_dict_given=kwargs.get("state_dict") is not None,
            disk_offload=bool(kwargs.get("offload_folder") or kwargs.get("offload_state_dict")),
            parallel_shard_env=self._parallel_shard_env(),
            disable_mmap=bool(kwargs.get("disable_mmap")),
            torch_modes=thread_modes.user_torch_modes(),
        )

    def _deepspeed_zero3(self) -> bool:
        try:
            from transformers.integrations import is_deepspeed_zero3_enabled

            return bool(is_deepspeed_zero3_enabled())
        except Exception:  # noqa: BLE001
            return False

    def _fsdp_low_mem(self) -> bool:
        try:
            from transformers.integrations import is_fsdp_enabled

            return bool(is_fsdp_enabled())
        except Exception:  # noqa: BLE001
            return False

    def _parallel_shard_env(self) -> bool:
        return False


def quant_library(method: str | None) -> str | None:
    """The version of the library that quantises, for the rows that depend on it."""
    if method != capabilities.BNB:
        return None
    from fasthug_patch import quant

    return quant.bnb_version()


def quant_method_of(quantizer) -> str | None:
    """A transformers HfQuantizer's method, as the capability table names it."""
    return _quant_method(quantizer.quantization_config) if quantizer is not None else None


def _quant_method(config) -> str | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return str(config.get("quant_method", "unknown"))
    method = getattr(config, "quant_method", None)
    return str(getattr(method, "value", method) or type(config).__name__)


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_checkpoint_paths(files, sharded_metadata, model_path, subfolder: str) -> None:
    """Every weight file must lie inside the checkpoint directory. Stock joins index.json's
    weight_map entries onto the directory as they are, so ``../x.safetensors`` or
    ``/abs/x.safetensors`` reads a file elsewhere without a word. The check is lexical, as
    stock's own check of ``transformers_weights`` (5.x) is: symlinks inside the directory
    (the hub cache's snapshot folders are made of them) stay allowed."""
    local = model_path is not None and os.path.isdir(str(model_path))
    base = os.path.abspath(os.path.join(str(model_path), subfolder or "")) if local else None
    advice = (
        "fasthug_patch does not read weight files outside the checkpoint directory (stock transformers "
        "would). Fix the checkpoint, or load with fasthug_patch.disabled() if you trust it"
    )
    weight_map = sharded_metadata.get("weight_map") if isinstance(sharded_metadata, dict) else None
    for tensor, entry in (weight_map or {}).items():
        if isinstance(entry, str) and (os.path.isabs(entry) or os.path.normpath(entry).split(os.sep)[0] == ".."):
            raise CheckpointPathError(
                os.path.join(base, entry) if base else entry,
                f"the checkpoint index (weight_map) names {entry!r} for tensor {tensor!r}, outside the "
                f"checkpoint directory{' ' + base if base else ''}; {advice}",
            )
    if base is None:
        return  # a hub id (files resolved inside the cache) or a single weights file
    for file in files or []:
        if os.path.commonpath([base, os.path.abspath(str(file))]) != base:
            raise CheckpointPathError(str(file), f"weight file outside the checkpoint directory {base}; {advice}")
