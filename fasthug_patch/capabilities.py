"""The capability table: when the fast path is safe, and why not when it is not.

Each row is one rule: a condition over plain facts about the call, and the reason a user
reads when that condition sends the load to the stock loader. Rows are checked in order and
the first that matches decides; no match means the fast path. Rules of stage "call" are
checked when from_pretrained is entered (facts from its arguments and the model class);
rules of stage "load" are checked by the adapter when weights are about to be assigned
(facts from transformers' own resolved loading arguments, e.g. the expanded device map).

docs/compatibility.md is generated from this table (``python -m fasthug_patch.compat_doc``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fasthug_patch import settings

# Transformers lines whose internals the adapters know (first and last minor, inclusive).
ADAPTER_LINES = {
    "v4_legacy": ((4, 43), (4, 49)),  # load_state_dict + _load_state_dict_into_model / _meta_model
    "v4": ((4, 50), (4, 57)),  # load_shard_file-style loop over _load_state_dict_into_meta_model
    "v5": ((5, 0), (5, 10**9)),  # core_model_loading.convert_and_load_state_dict_in_model
}
# The minor lines the compatibility matrix (scripts/matrix.py) checks, and the release it
# installs for each. A minor outside this table takes the stock path, with a reason naming
# the version, unless FASTHUG_ALLOW_UNTESTED=1.
TESTED = {
    (4, 43): "4.43.4", (4, 44): "4.44.2", (4, 45): "4.45.2", (4, 46): "4.46.3", (4, 47): "4.47.1",
    (4, 48): "4.48.3", (4, 49): "4.49.0", (4, 50): "4.50.3", (4, 51): "4.51.3", (4, 52): "4.52.4",
    (4, 53): "4.53.3", (4, 54): "4.54.1", (4, 55): "4.55.4", (4, 56): "4.56.2", (4, 57): "4.57.6",
    (5, 0): "5.0.0", (5, 1): "5.1.0", (5, 2): "5.2.0", (5, 3): "5.3.0", (5, 4): "5.4.0",
    (5, 5): "5.5.4", (5, 6): "5.6.2", (5, 7): "5.7.0", (5, 8): "5.8.1", (5, 9): "5.9.0",
    (5, 10): "5.10.4", (5, 11): "5.11.0", (5, 12): "5.12.1", (5, 13): "5.13.1", (5, 14): "5.14.1",
    (5, 15): "5.15.1", (5, 16): "5.16.1", (5, 17): "5.17.0", (5, 18): "5.18.0", (5, 19): "5.19.0",
    (5, 20): "5.20.2", (5, 21): "5.21.1", (5, 22): "5.22.2", (5, 23): "5.23.0",
    (5, 24): "5.24.0",
}
# What CI runs on every submission: the oldest line, one in the middle, 4.57, the newest.
CI_SUBSET = [min(TESTED), (4, 50), (4, 57), max(TESTED)]


@dataclass
class Facts:
    """What the rules look at. Unknown facts stay None and match no rule."""

    transformers_version: str = ""
    model_class: str = ""
    model_module: str = ""
    device_kinds: frozenset[str] = frozenset()  # "cpu", "cuda", "disk", "auto", "meta", ...
    quantization: str | None = None  # quant method, when quantizing or pre-quantised
    quant_library: str | None = None  # the bitsandbytes version, when quantization is bitsandbytes
    pre_quantized: bool | None = None  # the checkpoint holds quantised weights (known at the load stage)
    tensor_parallel: bool = False
    deepspeed_zero3: bool = False
    fsdp_low_mem: bool = False
    gguf: bool = False
    foreign_format: str | None = None  # "tf", "flax"
    state_dict_given: bool = False
    disk_offload: bool = False
    weights_format: str | None = None  # "safetensors", "bin", or something else
    parallel_shard_env: bool = False
    disable_mmap: bool = False
    dtensor_params: bool = False
    torch_modes: tuple[str, ...] = ()  # torch function / dispatch modes of the calling thread
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    key: str
    stage: str  # "call", "load", or "call+load"
    condition: str  # for people: when this row applies
    when: Callable[[Facts], bool]
    reason: Callable[[Facts], str]


@dataclass(frozen=True)
class Decision:
    fast: bool
    reason: str
    rule: str | None = None


def version_tuple(version: str) -> tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def adapter_line(version: str) -> str | None:
    minor = version_tuple(version)
    for line, (low, high) in ADAPTER_LINES.items():
        if low <= minor <= high:
            return line
    return None


def tested_span() -> str:
    """The minor lines the matrix checks, first to last ("4.43 to 5.24")."""
    low, high = min(TESTED), max(TESTED)
    return f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"


def _untested(f: Facts) -> bool:
    return version_tuple(f.transformers_version) not in TESTED and not settings.allow_untested_versions()


# Device kinds the fast path places weights on. CUDA targets are streamed through the
# pinned ring on the lines whose loader hands each tensor's device to us (5.x), and on 4.57,
# whose shard loop the v4 adapter answers with stock's own per-tensor devices.
_STREAMED_LINES = ("v5",)
V4_STREAMED_FROM = (4, 57)

# GPU paths written and tested on CPU with the stand-in device but not yet run on a GPU:
# taken only with FASTHUG_UNVERIFIED_GPU=1 until tests/test_gpu.py has passed on one
# (scripts/gpu_quant.sh sets it there), then moved out of this set.
UNVERIFIED_GPU = frozenset({"v4-cuda", "bnb-prequantised-cuda", "bnb-on-the-fly-cuda"})


def gpu_path_allowed(path: str) -> bool:
    return path not in UNVERIFIED_GPU or settings.unverified_gpu_paths()


def _streams_cuda(f: Facts) -> bool:
    if adapter_line(f.transformers_version) in _STREAMED_LINES:
        return True
    return version_tuple(f.transformers_version) >= V4_STREAMED_FROM and gpu_path_allowed("v4-cuda")


def _devices_not_streamed(f: Facts, also=frozenset()) -> frozenset[str]:
    handled = {"cpu"} | set(also)
    if _streams_cuda(f):
        handled.add("cuda")
    return frozenset(f.device_kinds - handled)


def _device_reason(f: Facts, also=frozenset()) -> str:
    kinds = sorted(_devices_not_streamed(f, also))
    if kinds == ["cuda"]:
        if version_tuple(f.transformers_version) >= V4_STREAMED_FROM:
            return (f"device_map places weights on cuda; on transformers {f.transformers_version} streaming to the GPU "
                    f"is written but not yet checked on a GPU: set {settings.UNVERIFIED_GPU_VAR}=1 to try it, or "
                    "load to CPU and call model.cuda(), which streams")
        return (f"device_map places weights on cuda; on transformers {f.transformers_version} the fast path loads "
                "to CPU only (GPU streaming needs 4.57 or 5.x): load to CPU and call model.cuda(), which streams")
    return f"device_map places weights on {kinds}; the fast path covers CPU and CUDA targets"


def _bnb_gpu_path(f: Facts) -> str:
    return "bnb-prequantised-cuda" if f.pre_quantized else "bnb-on-the-fly-cuda"


def _bnb_on_gpu_stock(f: Facts) -> bool:
    """bitsandbytes with weights bound for a GPU, where CUDA is streamed. A pre-quantised
    checkpoint's tensors are handed to the quantizer's own code as stock hands them;
    quantising on the fly reads ahead of stock's quantize op (5.x) or create_quantized_param
    (4.57) within a byte budget (lookahead.py), where stock reads one weight at a time so
    that full-precision copies never pile up on the GPU."""
    if f.quantization != BNB or not (f.device_kinds - {"cpu"}):
        return False
    return not (_streams_cuda(f) and not _devices_not_streamed(f, {"auto"}) and gpu_path_allowed(_bnb_gpu_path(f)))


def _bnb_on_gpu_reason(f: Facts) -> str:
    devices = sorted(f.device_kinds - {"cpu"})
    kind = "a pre-quantised bitsandbytes checkpoint" if f.pre_quantized else "bitsandbytes quantising on the fly"
    if not gpu_path_allowed(_bnb_gpu_path(f)):
        return (f"{kind} with weights on {devices}: the fast path for it is written but not yet checked on a GPU; "
                f"set {settings.UNVERIFIED_GPU_VAR}=1 to try it")
    return _device_reason(f, {"auto"})


BNB = "bitsandbytes"
# Lines whose adapter routes bitsandbytes loads (quantize ops, pre-quantised tensors).
_QUANT_LINES = ("v5",)
# From this 4.x release the adapter also routes bitsandbytes loads: 4.57 hands each quantised
# tensor (pre-quantised, or full precision to quantise on the fly) to the quantizer's
# create_quantized_param, and so do we. Older lines ask check_quantized_param with other
# arguments; they stay stock.
PREQUANTISED_FROM = (4, 57)


def _bnb_on_stock_line(f: Facts) -> bool:
    if f.quantization != BNB or adapter_line(f.transformers_version) in _QUANT_LINES:
        return False
    return version_tuple(f.transformers_version) < PREQUANTISED_FROM


def _bnb_line_reason(f: Facts) -> str:
    return (f"bitsandbytes loads through the stock loader on transformers {f.transformers_version}; the fast path "
            "handles it from 4.57")


def _bnb_verified(version: str | None) -> bool:
    from fasthug_patch import quant

    return quant.bnb_verified(version)


def _bnb_span() -> str:
    from fasthug_patch import quant

    return quant.verified_span()


RULES: list[Rule] = [
    Rule(
        "no-adapter", "call", "transformers line without an adapter",
        lambda f: adapter_line(f.transformers_version) is None,
        lambda f: f"transformers {f.transformers_version} has no fasthug_patch adapter (supported: {tested_span()})",
    ),
    Rule(
        "untested-version", "call", "transformers release not in the tested list",
        _untested,
        lambda f: f"transformers {f.transformers_version} is untested (tested: {tested_span()}); "
        f"set {settings.ALLOW_UNTESTED_VAR}=1 to try the fast path anyway",
    ),
    Rule(
        "remote-code", "call", "model class from trust_remote_code",
        lambda f: f.model_module.startswith("transformers_modules"),
        lambda f: f"{f.model_class} is remote code; its loading hooks are unknown to the fast path",
    ),
    Rule(
        "quant-method", "call+load", "a quantization method other than bitsandbytes",
        lambda f: f.quantization not in (None, BNB),
        lambda f: f"quantization ({f.quantization}) loads through the stock loader; the fast path quantises "
        "with bitsandbytes only",
    ),
    Rule(
        "bnb-line", "call+load", "bitsandbytes before 4.57",
        _bnb_on_stock_line,
        _bnb_line_reason,
    ),
    Rule(
        "bnb-version", "call+load", "bitsandbytes missing, or a release the parity tests have not checked",
        lambda f: f.quantization == BNB and not _bnb_verified(f.quant_library),
        lambda f: f"bitsandbytes {f.quant_library or '(not installed)'} is not one the fast path was checked "
        f"against ({_bnb_span()}); the stock loader quantises",
    ),
    Rule(
        "gguf", "call", "gguf_file given",
        lambda f: f.gguf,
        lambda f: "GGUF checkpoints are dequantised by the stock loader",
    ),
    Rule(
        "foreign-format", "call", "from_tf / from_flax",
        lambda f: f.foreign_format is not None,
        lambda f: f"{f.foreign_format} checkpoints are converted by the stock loader",
    ),
    Rule(
        "state-dict-given", "call", "state_dict passed to from_pretrained",
        lambda f: f.state_dict_given,
        lambda f: "weights were passed in memory (state_dict=...); nothing to read from disk",
    ),
    Rule(
        "tensor-parallel", "call", "tp_plan / device_mesh / tensor-parallel sharding",
        lambda f: f.tensor_parallel,
        lambda f: "tensor-parallel loading (tp_plan, device_mesh) shards weights in the stock loader",
    ),
    Rule(
        "deepspeed-zero3", "call", "DeepSpeed ZeRO-3 is enabled",
        lambda f: f.deepspeed_zero3,
        lambda f: "DeepSpeed ZeRO-3 partitions weights as they load; the stock loader does that",
    ),
    Rule(
        "fsdp-low-mem", "call", "FSDP cpu-RAM-efficient loading",
        lambda f: f.fsdp_low_mem,
        lambda f: "FSDP cpu-RAM-efficient loading (rank 0 loads, others stay on meta) runs stock",
    ),
    Rule(
        "disk-offload", "call", "offload_folder, offload_state_dict or 'disk' in device_map",
        lambda f: f.disk_offload or "disk" in f.device_kinds,
        lambda f: "offloading weights to disk runs through the stock loader",
    ),
    Rule(
        "accelerator-device", "call", "device_map names a device other than CPU or (on 5.x) CUDA",
        lambda f: bool(_devices_not_streamed(f, {"auto"})),
        lambda f: _device_reason(f, {"auto"}),
    ),
    Rule(
        "parallel-shards-env", "call", "HF_ENABLE_PARALLEL_LOADING is set (transformers 4.x)",
        lambda f: f.parallel_shard_env,
        lambda f: "HF_ENABLE_PARALLEL_LOADING makes transformers load shards in its own threads; "
        "unset it (the fast path reads in parallel already)",
    ),
    Rule(
        "disable-mmap", "call", "disable_mmap=True",
        lambda f: f.disable_mmap,
        lambda f: "disable_mmap=True asks for no memory map; the stock loader reads the file whole",
    ),
    Rule(
        "torch-modes", "call", "a torch function or dispatch mode (other than a default device) is active",
        lambda f: bool(f.torch_modes),
        lambda f: f"{', '.join(f.torch_modes)} is active where from_pretrained was called: stock runs its "
        "loading ops under it, the fast path's reader threads would not",
    ),
    # -- checked with transformers' resolved loading arguments ---------------------
    Rule(
        "weights-format", "load", "weights are neither safetensors nor a torch .bin",
        lambda f: f.weights_format is not None and f.weights_format not in ("safetensors", "bin"),
        lambda f: f"weights in {f.weights_format} format load through the stock loader",
    ),
    Rule(
        "load-bnb-device", "load",
        "bitsandbytes with weights placed on a GPU where the line does not stream CUDA, or not yet opted in",
        _bnb_on_gpu_stock,
        _bnb_on_gpu_reason,
    ),
    Rule(
        "load-devices", "load", "the resolved device map uses a device other than CPU or (on 5.x) CUDA",
        lambda f: bool(_devices_not_streamed(f)),
        lambda f: _device_reason(f),
    ),
    Rule(
        "load-sharded-params", "load", "parameters are DTensors or a device mesh is set",
        lambda f: f.dtensor_params or f.tensor_parallel,
        lambda f: "sharded (DTensor) parameters load through the stock loader",
    ),
]


def decide(facts: Facts, stage: str) -> Decision:
    for rule in RULES:
        if stage in rule.stage.split("+") and rule.when(facts):
            return Decision(False, rule.reason(facts), rule.key)
    return Decision(True, "")


def device_kinds(device_map) -> frozenset[str]:
    """The kinds of device a device_map names ("cpu", "cuda", "disk", "auto", ...)."""
    if device_map is None:
        return frozenset({"cpu"})
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    kinds = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            kinds.add("cuda")
            continue
        text = str(value)
        if text in ("auto", "balanced", "balanced_low_0", "sequential"):
            kinds.add("auto")
        else:
            kinds.add(text.split(":")[0])
    return frozenset(kinds)
