"""transformers 4.57: the only module that knows 4.x's private loading names.

4.57 flow: from_pretrained -> _load_pretrained_model -> load_shard_file per shard, which
builds a state dict (meta tensors for safetensors, torch.load'ed tensors for .bin) and
calls _load_state_dict_into_meta_model. That function, per tensor: reads the slice, asks
_infer_parameter_dtype for the target dtype, casts, makes it contiguous, moves it to its
device and assigns it with _load_parameter_into_model.

For the cases the capability table admits (CPU targets, no quantizer, no mesh, no FSDP
rank juggling) we do the same per-tensor steps with stock's own helpers for the dtype and
the assignment, but materialise every tensor of the shard in parallel through the engine
first. Anything else calls the stock function unchanged.
"""

from __future__ import annotations

from fasthug_patch import capabilities, loadcall
from fasthug_patch.adapters.base import Adapter, PatchTarget, env_true
from fasthug_patch.adapters.sources import check_bin_tensors
from fasthug_patch.capabilities import Facts
from fasthug_patch.entry import make_from_pretrained_wrapper
from fasthug_patch.errors import FastPathError


class V4Adapter(Adapter):
    name = "v4"
    dtype_kwarg = "torch_dtype"

    def patch_targets(self) -> list[PatchTarget]:
        mu = self.modeling_utils
        return [
            PatchTarget(mu.PreTrainedModel, "from_pretrained", make_from_pretrained_wrapper(self)),
            PatchTarget(mu, "_get_resolved_checkpoint_files", self._resolved_files),
            PatchTarget(mu, "_load_state_dict_into_meta_model", self._load_into_meta_model),
        ]

    def _parallel_shard_env(self) -> bool:
        return env_true("HF_ENABLE_PARALLEL_LOADING")

    def _load_into_meta_model(self, wrapped, instance, args, kwargs):
        call = loadcall.current()
        if call is None:
            return wrapped(*args, **kwargs)
        shard = _bind(*args, **kwargs)
        plan = self.admit(call, lambda: self._load_facts(shard), lambda: self._plan(call, shard))
        if plan is None:
            return wrapped(*args, **kwargs)

        call.entered_fast_internals = True
        with call.report.phase("load_weights"):
            self._load_shard(call, shard, plan)
        call.index.check_unchanged([shard["shard_file"]])  # replaced after its header was read: redo stock
        call.fast_loads += 1
        return shard["disk_offload_index"]

    # -- helpers ----------------------------------------------------------------
    def _load_facts(self, shard) -> Facts:
        quantizer = shard["hf_quantizer"]
        device_map = shard["device_map"]
        return Facts(
            transformers_version=self.version,
            device_kinds=capabilities.device_kinds(device_map),
            quantization=str(quantizer.quantization_config.quant_method) if quantizer is not None else None,
            tensor_parallel=shard["device_mesh"] is not None,
            fsdp_low_mem=self._fsdp_low_mem(),
            weights_format="safetensors" if shard["shard_file"].endswith(".safetensors") else "bin",
        )

    def _plan(self, call, shard) -> list[tuple[str, object]]:
        """(parameter name, source) per tensor, checked against what stock would read."""
        state_dict = shard["state_dict"]
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
        mu = self.modeling_utils
        model, state_dict = shard["model"], shard["state_dict"]
        engine = call.materializer
        pending = []
        for name, source in plan:
            _, dtype = mu._infer_parameter_dtype(
                model, name, state_dict[name], shard["keep_in_fp32_regex"], shard["hf_quantizer"]
            )
            pending.append((name, engine.submit(source, dtype, "cpu")))
        is_bin = not shard["shard_file"].endswith(".safetensors")
        for name, future in pending:
            mu._load_parameter_into_model(model, name, future.result())
            if is_bin:  # as stock: drop the loaded entry so its memory can go
                del state_dict[name]


def _bind(
    model,
    state_dict,
    shard_file,
    reverse_renaming_mapping,
    device_map=None,
    disk_offload_folder=None,
    disk_offload_index=None,
    hf_quantizer=None,
    keep_in_fp32_regex=None,
    device_mesh=None,
):
    return dict(
        model=model,
        state_dict=state_dict,
        shard_file=shard_file,
        reverse_renaming_mapping=reverse_renaming_mapping,
        device_map=device_map,
        disk_offload_folder=disk_offload_folder,
        disk_offload_index=disk_offload_index,
        hf_quantizer=hf_quantizer,
        keep_in_fp32_regex=keep_in_fp32_regex,
        device_mesh=device_mesh,
    )
