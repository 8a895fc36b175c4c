"""Helpers for stock-vs-fast parity tests.

* :func:`build_checkpoint` writes a seeded random checkpoint of a catalogue entry
  with ``save_pretrained`` (safetensors or ``.bin``, sharded, variant, any dtype);
  :func:`checkpoint_builder` writes each (entry, dtype) once, on first use.
* :func:`edit_safetensors` deletes / adds tensors in a saved ``.safetensors`` file.
* :func:`load_pair` loads one checkpoint twice: stock under ``fasthug_patch.disabled()``
  and fast under ``fasthug_patch.enabled()``, and returns both plus the fast report.
* :func:`assert_same_model` asserts two loaded models are the same bit for bit:
  state dict (bytes, dtype, device, shape, stride), parameters / buffers and their
  ``requires_grad``, tied-parameter groups, loading info, config, generation config
  and the outputs of a forward pass on fixed inputs.

Works with transformers 4.57 (``torch_dtype=``) and 5.x (``dtype=``); see
:func:`dtype_kwargs`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.architectures import IS_V5, Arch

# Seed set right before every from_pretrained call, so weights that stock
# initialises (missing keys, new heads) get the same random values in both loads.
LOAD_SEED = 1234
FORWARD_SEED = 4321


class _Default:
    """Sentinel: pass no dtype kwarg at all (4.57 then loads fp32, 5.x 'auto')."""

    def __repr__(self) -> str:
        return "default"


DEFAULT = _Default()


# --------------------------------------------------------------------------- version helpers


def dtype_kwargs(dtype: Any = DEFAULT) -> dict:
    """``{"torch_dtype": dtype}`` on 4.x, ``{"dtype": dtype}`` on 5.x, ``{}`` for DEFAULT."""
    if dtype is DEFAULT:
        return {}
    return {"dtype": dtype} if IS_V5 else {"torch_dtype": dtype}


def dtype_name(dtype: Any) -> str:
    if dtype is DEFAULT:
        return "default"
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(dtype)


# --------------------------------------------------------------------------- checkpoints


def make_model(entry: Arch, dtype: torch.dtype = torch.float32):
    """Seeded random model of ``entry`` in eval mode.

    Every floating parameter gets seeded noise added on top of its initialiser, so no
    tensor is left at a trivial value (all-ones norms, zero biases) that an
    initialiser would reproduce by accident; BatchNorm running statistics and
    ``num_batches_tracked`` are set to non-default values for the same reason.
    """
    torch.manual_seed(entry.seed)
    config = entry.make_config()
    model = entry.auto.from_config(config)
    gen = torch.Generator().manual_seed(entry.seed)
    with torch.no_grad():
        for param in model.parameters():  # deduplicated: tied params are touched once
            if param.is_floating_point():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_((noise * 0.02).to(param.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
    model.to(dtype)
    model.eval()
    return model


def _bin_name(safetensors_name: str) -> str:
    """model[...].safetensors -> pytorch_model[...].bin, same for index files."""
    return "pytorch_" + safetensors_name.replace(".safetensors", ".bin")


def _convert_to_bin(directory: Path) -> None:
    """Rewrite every safetensors file (and index) of a save_pretrained dir as .bin.

    transformers 5.x ``save_pretrained`` writes safetensors only (no
    ``safe_serialization`` argument), but still loads ``pytorch_model*.bin``; the
    files written here use the same names and torch.save format 4.x writes.
    """
    for path in sorted(directory.glob("model*.safetensors")):
        state = load_file(str(path))
        torch.save(state, directory / _bin_name(path.name))
        path.unlink()
    for path in sorted(directory.glob("model.safetensors.index*.json")):
        index = json.loads(path.read_text())
        index["weight_map"] = {k: _bin_name(v) for k, v in index["weight_map"].items()}
        (directory / _bin_name(path.name)).write_text(json.dumps(index, indent=2, sort_keys=True))
        path.unlink()


def build_checkpoint(
    entry: Arch,
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    safe_serialization: bool = True,
    save_kwargs: dict | None = None,
) -> Path:
    """Save a seeded random ``entry`` model with ``save_pretrained``; return the directory.

    ``save_kwargs`` go to ``save_pretrained`` as they are (e.g. 5.x's
    ``save_original_format=False``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = make_model(entry, dtype)
    kwargs: dict[str, Any] = dict(save_kwargs or {})
    if variant is not None:
        kwargs["variant"] = variant
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    if IS_V5:
        model.save_pretrained(directory, **kwargs)
        if not safe_serialization:
            _convert_to_bin(directory)
    else:
        model.save_pretrained(directory, safe_serialization=safe_serialization, **kwargs)
    return directory


def checkpoint_builder(root: str | os.PathLike):
    """``get(entry, dtype=float32) -> path``: build_checkpoint under ``root``, each
    (entry, dtype) written once, on first use (for module- or session-scoped fixtures)."""
    built: dict[tuple[str, torch.dtype], Path] = {}

    def get(entry: Arch, dtype: torch.dtype = torch.float32) -> Path:
        key = (entry.name, dtype)
        if key not in built:
            built[key] = build_checkpoint(entry, Path(root) / f"{entry.name}-{str(dtype).removeprefix('torch.')}", dtype)
        return built[key]

    return get


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """Weight files (not index/config) in a checkpoint directory, sorted."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in checkpoint_files(directory))


def edit_safetensors(
    path: str | os.PathLike,
    drop: list[str] | tuple[str, ...] = (),
    add: dict[str, torch.Tensor] | None = None,
) -> None:
    """Remove ``drop`` keys from / add ``add`` tensors to a safetensors file in place.

    The file keeps the metadata ``{"format": "pt"}`` that transformers requires.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path))
    for key in drop:
        del state[key]  # KeyError on a typo is intended
    state.update(add or {})
    metadata = {**metadata, "format": "pt"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedPair:
    stock: Any
    stock_info: dict
    fast: Any
    fast_info: dict
    report: Any  # fasthug_patch.last_report() right after the fast load
    # torch's CPU generator state right after each load (both seeded alike before it): the
    # fast path draws what stock draws, no more, no less
    stock_rng: Any = None
    fast_rng: Any = None


def load_model(auto_class, path, **kwargs):
    """Seeded ``from_pretrained(..., output_loading_info=True)``; returns (model, info).

    The loading info is also attached to the model as ``_parity_loading_info`` so that
    :func:`assert_same_model` finds it without extra arguments.
    """
    if isinstance(auto_class, Arch):
        auto_class = auto_class.auto
    elif isinstance(auto_class, str):
        auto_class = getattr(transformers, auto_class)
    torch.manual_seed(LOAD_SEED)
    source = None if path is None else str(path)  # None: config= and state_dict= given
    model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    model._parity_loading_info = info
    return model, info


def load_pair(auto_class, path, **kwargs) -> LoadedPair:
    """Load ``path`` with stock (``disabled()``) then fast (``enabled()``) loading.

    ``auto_class`` is an Auto class, its name, or a catalogue entry (its Auto class).
    ``kwargs`` go to both ``from_pretrained`` calls unchanged (use
    :func:`dtype_kwargs` for the dtype).
    """
    import fasthug_patch  # deferred: the harness self-tests run without the plugin

    with fasthug_patch.disabled():
        stock, stock_info = load_model(auto_class, path, **kwargs)
        stock_rng = torch.get_rng_state()
    with fasthug_patch.enabled():
        before = fasthug_patch.last_report()
        fast, fast_info = load_model(auto_class, path, **kwargs)
        fast_rng = torch.get_rng_state()
        report = fasthug_patch.last_report()
    if report is not None and report is before:
        report = None  # stale: this load did not go through the patch at all
    return LoadedPair(stock, stock_info, fast, fast_info, report, stock_rng, fast_rng)


def adopt_values_stock_leaves_undefined(pair: LoadedPair, auto_class, path, **kwargs) -> list[str]:
    """Missing keys that stock itself does not reproduce, given stock's bytes on the fast side.

    Some lines leave a missing tensor uninitialised (``torch.empty``: RWKV's
    ``feed_forward.value.weight`` on 4.43-4.45), so two stock loads of the same checkpoint
    differ there and "same as stock" has no meaning for those bytes. A second stock load
    finds them: only missing keys whose bytes differ between the two stock loads are
    adopted (after checking the fast tensor has the same dtype and shape), and every other
    tensor, buffer and output is still compared. Returns the adopted names."""
    import fasthug_patch

    missing = (pair.stock_info or {}).get("missing_keys") or []
    if not missing:
        return []
    with fasthug_patch.disabled():
        again, _ = load_model(auto_class, path, **kwargs)
    stock, second, fast = pair.stock.state_dict(), again.state_dict(), pair.fast.state_dict()
    adopted = []
    for name in missing:
        if name not in stock or name not in second or tensors_bitwise_equal(stock[name], second[name]):
            continue
        assert name in fast and fast[name].dtype == stock[name].dtype and fast[name].shape == stock[name].shape, name
        with torch.no_grad():
            fast[name].copy_(stock[name])
        adopted.append(name)
    return adopted


@dataclass
class FailedPair:
    stock_error: BaseException | None
    fast_error: BaseException | None
    report: Any


def load_pair_expecting_failure(auto_class, path, **kwargs) -> FailedPair:
    """Like :func:`load_pair` for loads that stock refuses: catches both exceptions."""
    import fasthug_patch

    errors: list[BaseException | None] = []
    report = None
    for scope in (fasthug_patch.disabled, fasthug_patch.enabled):
        with scope():
            before = fasthug_patch.last_report()
            try:
                load_model(auto_class, path, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the point is to compare them
                errors.append(exc)
            else:
                errors.append(None)
            report = fasthug_patch.last_report()
    if report is before:
        report = None
    return FailedPair(errors[0], errors[1], report)


def assert_same_failure(failed: FailedPair, context: str = "") -> None:
    """Stock raised; fast must raise the same exception type with the same message."""
    head = f"{context}: " if context else ""
    s, f = failed.stock_error, failed.fast_error
    assert s is not None, f"{head}stock loaded fine; this case expects a stock failure"
    assert f is not None, f"{head}stock raised {type(s).__name__}: {s}; fast loaded without error"
    assert type(s) is type(f) and str(s) == str(f), (
        f"{head}different failures:\n  stock: {type(s).__name__}: {s}\n  fast:  {type(f).__name__}: {f}"
    )


@dataclass
class Outcome:
    """One checkpoint loaded (or refused) by stock, then by the patch; see load_both."""

    stock: Any
    stock_error: BaseException | None
    fast: Any
    fast_error: BaseException | None
    report: Any

    @property
    def stock_raised(self) -> bool:
        return self.stock_error is not None


def load_both(auto_class, path, **kwargs) -> Outcome:
    """Like :func:`load_pair`, for checkpoints that may or may not load: each load's model
    or exception, whichever it gave."""
    import fasthug_patch

    results: list[tuple[Any, BaseException | None]] = []
    report = before = None
    for scope in (fasthug_patch.disabled, fasthug_patch.enabled):
        with scope():
            before = fasthug_patch.last_report()
            try:
                results.append((load_model(auto_class, path, **kwargs)[0], None))
            except Exception as exc:  # noqa: BLE001 - the point is to compare them
                results.append((None, exc))
            report = fasthug_patch.last_report()
    if report is before:
        report = None
    (stock, stock_error), (fast, fast_error) = results
    return Outcome(stock, stock_error, fast, fast_error, report)


def assert_matches_stock(outcome: Outcome, names=(), same_message: bool = True, context: str = "") -> None:
    """The patch's promise for any checkpoint, good or broken.

    Stock loaded: the patch loaded the same model, bit for bit. Stock raised: the patch
    raised the same exception type with the same message (``same_message=False`` where
    stock's own message varies from run to run), or a subclass of it whose message names
    every string in ``names`` (the file, the tensor): a clearer error, never a model.
    """
    head = f"{context}: " if context else ""
    s, f = outcome.stock_error, outcome.fast_error
    if s is None:
        assert f is None, f"{head}stock loaded; the patch raised {type(f).__name__}: {f}"
        assert_same_model(outcome.stock, outcome.fast, context=context)
        return
    assert f is not None, f"{head}stock raised {type(s).__name__}: {s}; the patch returned a model"
    assert outcome.fast is None
    assert isinstance(f, type(s)), (
        f"{head}different failures:\n  stock: {type(s).__name__}: {s}\n  fast:  {type(f).__name__}: {f}"
    )
    if type(f) is type(s):
        if same_message:
            assert str(f) == str(s), f"{head}same type, different message:\n  stock: {s}\n  fast:  {f}"
    else:
        missing = [n for n in names if n not in str(f)]
        assert names and not missing, f"{head}{type(f).__name__} is not clearer than stock's: {f} (missing {missing})"


# --------------------------------------------------------------------------- comparison


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().reshape(-1).view(torch.uint8)


def tensors_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return a.device.type == b.device.type
    return torch.equal(_raw_bytes(a).cpu(), _raw_bytes(b).cpu())


def _describe_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    try:
        diff = (a.detach().float().cpu() - b.detach().float().cpu()).abs()
        n = int((_raw_bytes(a).cpu() != _raw_bytes(b).cpu()).sum())
        return f"{n} differing bytes, max abs diff {diff.nan_to_num(nan=float('inf')).max().item():.3g}"
    except Exception as exc:  # pragma: no cover - diagnostics only
        return f"(no diff summary: {exc})"


def _tensor_props(t: torch.Tensor) -> dict:
    return {
        "dtype": t.dtype,
        "device": t.device,
        "shape": tuple(t.shape),
        "stride": t.stride(),
        "layout": t.layout,
        # made inside torch.inference_mode() on the loading thread: such a tensor cannot
        # be updated in place outside it, so the model cannot be trained
        "inference": t.is_inference(),
    }


def _named_tensors(model) -> list[tuple[str, torch.Tensor]]:
    out = list(model.named_parameters(remove_duplicate=False))
    out += list(model.named_buffers(remove_duplicate=False))
    return out


def tied_groups(model) -> list[list[str]]:
    """Groups (size >= 2) of parameter/buffer names that are the same tensor object."""
    groups: dict[int, list[str]] = {}
    for name, t in _named_tensors(model):
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def alias_groups(model) -> list[list[str]]:
    """Groups of names whose tensors view exactly the same memory.

    Keyed by (data_ptr, dtype, shape, stride): equal keys mean the two tensors read
    and write the same elements, which is what a tie is.  Keyed on the element
    pointer rather than ``untyped_storage().data_ptr()`` so that distinct tensors that
    happen to live in one big storage (e.g. views into one mmapped file) are not
    mistaken for ties.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in _named_tensors(model):
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        groups.setdefault(key, []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def _normalise_info(info: dict | None) -> dict:
    if info is None:
        return {}
    out = {}
    for key, value in dict(info).items():
        if isinstance(value, (list, tuple, set, frozenset)):
            out[key] = sorted((_freeze(v) for v in value), key=repr)
        elif isinstance(value, dict):
            out[key] = sorted(((_freeze(k), _freeze(v)) for k, v in value.items()), key=repr)
        else:
            out[key] = _freeze(value)
    return out


def _freeze(value):
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted((_freeze(v) for v in value), key=repr))
    if isinstance(value, dict):
        return tuple(sorted(((k, _freeze(v)) for k, v in value.items()), key=repr))
    return value


def flatten_outputs(obj, prefix: str = "out") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a model output: tensors, plus type names of other leaves."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if obj is None or isinstance(obj, (int, float, bool, str)):
        return [(prefix, obj)]
    if isinstance(obj, dict):  # includes ModelOutput
        items = []
        for k, v in obj.items():
            items += flatten_outputs(v, f"{prefix}.{k}")
        return items
    if isinstance(obj, (list, tuple)):
        items = []
        for i, v in enumerate(obj):
            items += flatten_outputs(v, f"{prefix}[{i}]")
        return items
    # caches and other objects: compare whatever tensors they expose, and the type
    items = [(prefix + ".__type__", type(obj).__name__)]
    layers = getattr(obj, "layers", None)
    if isinstance(layers, (list, tuple)):
        for i, layer in enumerate(layers):
            for attr in ("keys", "values"):
                val = getattr(layer, attr, None)
                if isinstance(val, torch.Tensor):
                    items.append((f"{prefix}.layers[{i}].{attr}", val))
    for attr in ("key_cache", "value_cache"):
        val = getattr(obj, attr, None)
        if isinstance(val, (list, tuple)):
            items += flatten_outputs(list(val), f"{prefix}.{attr}")
    return items


def _model_dtype(model) -> torch.dtype:
    try:
        return model.dtype
    except Exception:  # pragma: no cover
        return next(p.dtype for p in model.parameters() if p.is_floating_point())


def prepare_inputs(model, inputs: dict) -> dict:
    """Cast floating inputs (pixels, audio, features) to the model's dtype, and move them to
    the device of its first parameter when that is not the CPU (GPU tests)."""
    dtype = _model_dtype(model)
    first = next(model.parameters(), None)
    device = first.device if first is not None and first.device.type not in ("cpu", "meta") else None
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.to(dtype)
        if isinstance(v, torch.Tensor) and device is not None:
            v = v.to(device)
        out[k] = v
    return out


def run_forward(model, inputs: dict):
    """(outputs, None) or (None, exception) for a seeded no-grad eval forward."""
    model.eval()
    torch.manual_seed(FORWARD_SEED)
    try:
        with torch.no_grad():
            return model(**prepare_inputs(model, inputs)), None
    except Exception as exc:  # parity of failures is checked too
        return None, exc


def model_differences(stock, fast, inputs: dict | None = None, stock_info=None, fast_info=None) -> list[str]:
    """Every way in which ``fast`` differs from ``stock``; empty list when identical."""
    problems: list[str] = []

    def check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    check(type(stock) is type(fast), f"model class {type(stock).__name__} != {type(fast).__name__}")

    # -- state dict: same keys (and order), dtype, device, shape, stride, bytes
    sd_s, sd_f = stock.state_dict(), fast.state_dict()
    keys_s, keys_f = list(sd_s), list(sd_f)
    if set(keys_s) != set(keys_f):
        problems.append(
            f"state_dict keys differ: only stock {sorted(set(keys_s) - set(keys_f))[:10]}, "
            f"only fast {sorted(set(keys_f) - set(keys_s))[:10]}"
        )
    elif keys_s != keys_f:
        problems.append("state_dict key order differs")
    for key in keys_s:
        if key not in sd_f:
            continue
        a, b = sd_s[key], sd_f[key]
        pa, pb = _tensor_props(a), _tensor_props(b)
        if pa != pb:
            diffs = {k: (pa[k], pb[k]) for k in pa if pa[k] != pb[k]}
            problems.append(f"{key}: tensor properties differ (stock, fast): {diffs}")
            if pa["dtype"] != pb["dtype"] or pa["shape"] != pb["shape"]:
                continue
        if not tensors_bitwise_equal(a, b):
            problems.append(f"{key}: values differ ({_describe_diff(a, b)})")

    # -- parameters vs buffers, Parameter class, requires_grad
    params_s = {n: p for n, p in stock.named_parameters(remove_duplicate=False)}
    params_f = {n: p for n, p in fast.named_parameters(remove_duplicate=False)}
    check(sorted(params_s) == sorted(params_f), "named_parameters names differ: "
          f"only stock {sorted(set(params_s) - set(params_f))[:10]}, only fast {sorted(set(params_f) - set(params_s))[:10]}")
    for name in sorted(set(params_s) & set(params_f)):
        a, b = params_s[name], params_f[name]
        check(type(a) is type(b), f"{name}: parameter class {type(a).__name__} != {type(b).__name__}")
        check(a.requires_grad == b.requires_grad, f"{name}: requires_grad {a.requires_grad} != {b.requires_grad}")
        check(a.is_inference() == b.is_inference(), f"{name}: is_inference() {a.is_inference()} != {b.is_inference()}")
    bufs_s = sorted(n for n, _ in stock.named_buffers(remove_duplicate=False))
    bufs_f = sorted(n for n, _ in fast.named_buffers(remove_duplicate=False))
    check(bufs_s == bufs_f, f"named_buffers names differ: only stock {sorted(set(bufs_s) - set(bufs_f))[:10]}, "
          f"only fast {sorted(set(bufs_f) - set(bufs_s))[:10]}")
    # non-persistent buffers (rotary inv_freq, position ids, ...) are not in the
    # state dict but are part of the model too
    nb_s = dict(stock.named_buffers(remove_duplicate=False))
    nb_f = dict(fast.named_buffers(remove_duplicate=False))
    for name in sorted(set(nb_s) & set(nb_f) - set(sd_s)):
        a, b = nb_s[name], nb_f[name]
        if _tensor_props(a) != _tensor_props(b) or not tensors_bitwise_equal(a, b):
            problems.append(f"non-persistent buffer {name} differs")

    # -- ties
    ts, tf = tied_groups(stock), tied_groups(fast)
    check(ts == tf, f"tied parameter groups differ: stock {ts} fast {tf}")
    as_, af = alias_groups(stock), alias_groups(fast)
    check(as_ == af, f"memory-alias groups differ: stock {as_} fast {af}")

    # -- module state
    train_s = sorted(n for n, m in stock.named_modules() if m.training)
    train_f = sorted(n for n, m in fast.named_modules() if m.training)
    check(train_s == train_f, f"modules in training mode differ: stock {train_s[:5]} fast {train_f[:5]}")
    check(
        getattr(stock, "hf_device_map", None) == getattr(fast, "hf_device_map", None),
        f"hf_device_map {getattr(stock, 'hf_device_map', None)} != {getattr(fast, 'hf_device_map', None)}",
    )
    check(_model_dtype(stock) == _model_dtype(fast), f"model.dtype {_model_dtype(stock)} != {_model_dtype(fast)}")

    # -- loading info
    if stock_info is None:
        stock_info = getattr(stock, "_parity_loading_info", None)
    if fast_info is None:
        fast_info = getattr(fast, "_parity_loading_info", None)
    ni_s, ni_f = _normalise_info(stock_info), _normalise_info(fast_info)
    for key in sorted(set(ni_s) | set(ni_f)):
        check(ni_s.get(key) == ni_f.get(key), f"loading info {key!r}: stock {ni_s.get(key)} fast {ni_f.get(key)}")

    # -- config and generation config
    cs, cf = stock.config.to_dict(), fast.config.to_dict()
    if cs != cf:
        diff = {k: (cs.get(k), cf.get(k)) for k in sorted(set(cs) | set(cf)) if cs.get(k) != cf.get(k)}
        problems.append(f"config differs (stock, fast): {diff}")
    attn_s = getattr(stock.config, "_attn_implementation", None)
    attn_f = getattr(fast.config, "_attn_implementation", None)
    check(attn_s == attn_f, f"attention implementation {attn_s} != {attn_f}")
    gs, gf = getattr(stock, "generation_config", None), getattr(fast, "generation_config", None)
    check((gs is None) == (gf is None), f"generation_config presence differs: stock {gs is not None}, fast {gf is not None}")
    if gs is not None and gf is not None:
        ds, df = gs.to_dict(), gf.to_dict()
        if ds != df:
            diff = {k: (ds.get(k), df.get(k)) for k in sorted(set(ds) | set(df)) if ds.get(k) != df.get(k)}
            problems.append(f"generation_config differs (stock, fast): {diff}")

    # -- forward pass
    if inputs is not None:
        out_s, err_s = run_forward(stock, inputs)
        out_f, err_f = run_forward(fast, inputs)
        if err_s is not None or err_f is not None:
            same_err = type(err_s) is type(err_f) and str(err_s) == str(err_f)
            check(same_err, f"forward: stock raised {err_s!r}, fast raised {err_f!r}")
        else:
            flat_s, flat_f = flatten_outputs(out_s), flatten_outputs(out_f)
            paths_s, paths_f = [p for p, _ in flat_s], [p for p, _ in flat_f]
            check(paths_s == paths_f, f"output structure differs: {paths_s} vs {paths_f}")
            for (path, a), (_, b) in zip(flat_s, flat_f):
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    if a.dtype != b.dtype or a.shape != b.shape:
                        problems.append(f"{path}: dtype/shape {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}")
                    elif not tensors_bitwise_equal(a, b):
                        problems.append(f"{path}: outputs differ ({_describe_diff(a, b)})")
                elif a != b or type(a) is not type(b):
                    problems.append(f"{path}: {a!r} != {b!r}")
    return problems


def assert_same_model(stock, fast, inputs: dict | None = None, *, stock_info=None, fast_info=None, context: str = "") -> None:
    """Assert ``fast`` is bit-for-bit the model ``stock`` is (see module docstring).

    Loading info comes from ``stock_info``/``fast_info`` or, by default, from the
    ``_parity_loading_info`` attribute that :func:`load_model` attaches.
    """
    problems = model_differences(stock, fast, inputs, stock_info=stock_info, fast_info=fast_info)
    if problems:
        head = f"{context}: " if context else ""
        shown = problems[:25]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise AssertionError(f"{head}fast model differs from stock in {len(problems)} way(s):\n  " + "\n  ".join(shown) + more)


def assert_same_pair(pair: LoadedPair, inputs: dict | None = None, context: str = "") -> None:
    assert_same_model(pair.stock, pair.fast, inputs, stock_info=pair.stock_info, fast_info=pair.fast_info, context=context)
    if pair.stock_rng is not None and pair.fast_rng is not None:
        assert torch.equal(pair.stock_rng, pair.fast_rng), (
            f"{context + ': ' if context else ''}the fast load left torch's random generator elsewhere than stock")


def report_path(report) -> str:
    """``report.path`` or a descriptive placeholder when there is no report."""
    if report is None:
        return "<no report>"
    return str(getattr(report, "path", "<report without .path>"))


def report_reason(report) -> str:
    return str(getattr(report, "reason", "")) if report is not None else ""


_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}")


def shard_count(directory: str | os.PathLike) -> int:
    return sum(1 for p in checkpoint_files(directory) if _SHARD_RE.search(p.name))
