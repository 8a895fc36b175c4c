"""One benchmark trial: one ``from_pretrained`` in a fresh process, one JSON line out.

    python -m fasthug_patch.bench.trial --mode stock|patched --path P
        [--dtype bf16|fp16|fp32|auto|default] [--device cpu|cuda] [--forward] [--quant 8bit|4bit]

Not timed: importing torch, transformers, the model's modeling module, bitsandbytes and
transformers' integration of it when the load is quantised (0.5-0.8 s on the reference VM,
mostly bnb's torch.compile wrappers pulling in inductor; the same cost on both sides, paid
inside the first quantised load otherwise), and, in patched mode, fasthug_patch. Timed: ``from_pretrained`` alone, and "time to ready" =
``from_pretrained`` + every weight page resident (one byte read per 4096-byte page of
every parameter's and buffer's storage). Optionally the first forward pass on a fixed
small input. Also reported: peak RSS, weight bytes, a sha256 digest of every weight
(names, dtypes, shapes, raw bytes, sorted by name), a digest of the tying structure, and
in patched mode the fasthug_patch report.

Stock mode never imports fasthug_patch. Run with ``-m``, Python imports the
``fasthug_patch`` package before this module, so stock mode then re-executes this file
as a plain script in a fresh interpreter (FASTHUG_ENABLE removed from its environment).
The runner always runs this file as a script.

This module imports nothing heavy at import time: tests import its helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time

PAGE = 4096
# bitsandbytes settings of --quant (and of the suite's pre-quantised checkpoints). Here, not
# in checkpoints.py: a stock trial must not import the fasthug_patch package.
BNB_SETTINGS = {
    "8bit": {"load_in_8bit": True},
    "4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
}
FORWARD_TOKENS = 16


# --------------------------------------------------------------------------- helpers


def _torch_dtype(dtype_arg: str):
    import torch

    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    try:
        return names[dtype_arg.lower()]
    except KeyError:
        raise SystemExit(f"trial: unsupported --dtype {dtype_arg!r}") from None


def dtype_kwargs(dtype_arg: str | None, transformers_version: str) -> dict:
    """The dtype keyword for from_pretrained: "dtype" on 5.x, "torch_dtype" on 4.x;
    none for "default" (each version's own default: fp32 on 4.x, "auto" on 5.x)."""
    if dtype_arg in (None, "", "default"):
        return {}
    value = "auto" if dtype_arg == "auto" else _torch_dtype(dtype_arg)
    key = "dtype" if int(transformers_version.split(".")[0]) >= 5 else "torch_dtype"
    return {key: value}


def named_tensors(model) -> list[tuple[str, object]]:
    """Every parameter and buffer (persistent or not) under every name it has, sorted."""
    items = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        items[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        if t is not None:
            items[name] = t
    return sorted(items.items())


def tensor_bytes(t):
    """The tensor's raw bytes as a numpy uint8 array (a view when it can be)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy()


def _hasher():
    """xxh3-128 where the xxhash package is installed (a 14 GB model hashes in about a
    second instead of ten), else sha256; trials of one run share an environment, so they
    compare like with like."""
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:
        return hashlib.sha256()


def digest_algorithm() -> str:
    """The digests' algorithm as the results name it: "sha256" or "xxh3_128" (xxhash's own
    name for it is "XXH3_128")."""
    return _hasher().name.lower()


def weights_digest(model) -> str:
    """A digest (see _hasher) over (name, dtype, shape, whether an inference tensor, raw bytes)
    of every tensor, in sorted name order."""
    h = _hasher()
    for name, t in named_tensors(model):
        kind = "inference" if t.is_inference() else "plain"
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0{kind}\0".encode())
        if t.device.type == "meta":
            h.update(b"<meta>")
            continue
        data = tensor_bytes(t)
        h.update(len(data).to_bytes(8, "little"))
        h.update(memoryview(data))
    return h.hexdigest()


def tie_digest(model) -> str:
    """sha256 of which names share memory (same pointer, shape and strides): tied
    weights must stay tied, untied ones untied."""
    first_of = {}
    h = hashlib.sha256()
    for name, t in named_tensors(model):
        if t.device.type == "meta" or t.numel() == 0:
            key = None
        else:
            key = (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        owner = first_of.setdefault(key, name) if key is not None else name
        h.update(f"{name}\0{owner}\n".encode())
    return h.hexdigest()


def unique_storages(model) -> list:
    """One uint8 view of each distinct storage under the model's tensors."""
    import torch

    seen, views = set(), []
    for _, t in named_tensors(model):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        views.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage))
    return views


def touch_pages(model) -> int:
    """Read one byte of every 4096-byte page of every weight storage (so all are
    resident); returns the number of bytes spanned."""
    total = 0
    for view in unique_storages(model):
        n = view.numel()
        int(view[::PAGE].sum()) + int(view[n - 1])  # the reads are the point
        total += n
    return total


def weight_bytes(model) -> int:
    """Bytes of the model's tensors, each distinct tensor (pointer, shape) counted once."""
    seen = {}
    for _, t in named_tensors(model):
        if t.device.type != "meta":
            seen[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def dtype_counts(model) -> dict:
    counts: dict[str, int] = {}
    for _, t in named_tensors(model):
        key = str(t.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + t.numel() * t.element_size()
    return counts


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM (reset by exec), else ru_maxrss."""
    hwm = _status_kb("VmHWM")
    if hwm:
        return hwm * 1024
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def faults() -> tuple[int, int]:
    """(minor, major) page faults of this process so far (all threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_majflt


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- the trial


def _prequantised_with_bnb(config) -> bool:
    """Whether the checkpoint's config says it was saved quantised by bitsandbytes."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def run_trial(args) -> dict:
    began_imports = time.perf_counter()
    fasthug = None
    if args.mode == "patched":
        import fasthug_patch as fasthug

        fasthug.enable()
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.path)
    cls = None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            break
    if cls is None:
        cls = transformers.AutoModel
    import importlib

    importlib.import_module(cls.__module__)  # the modeling module: imported, not timed
    import transformers.modeling_utils  # noqa: F401

    if args.quant or _prequantised_with_bnb(config):
        for module in ("bitsandbytes", "transformers.integrations.bitsandbytes"):
            importlib.import_module(module)  # imported like the modeling module: not timed

    kwargs = dtype_kwargs(args.dtype, transformers.__version__)
    # "cpu+cuda": load to the CPU, then model.cuda() (timed as part of the load)
    move_after = args.device.split("+", 1)[1] if "+" in args.device else None
    on_gpu = args.device.startswith("cuda") or move_after is not None
    if args.device != "cpu" and move_after is None:
        kwargs["device_map"] = args.device
    if args.quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**BNB_SETTINGS[args.quant])
        kwargs.setdefault("device_map", args.device)  # bitsandbytes picks a GPU when none is named
    import_s = time.perf_counter() - began_imports
    rss_before = rss_bytes()

    load = cls.from_pretrained
    if args.mode == "fasthug":
        # fasthug 0.0.6 (pip install fasthug), the comparison column: its own entry point,
        # which takes no dtype/device arguments and loads the checkpoint's dtype as is.
        import fasthug as fasthug_006

        if kwargs:
            raise SystemExit(f"trial: fasthug 0.0.6 takes no {', '.join(kwargs)} argument")
        load = fasthug_006.from_pretrained
    cuda_init_s = None
    if args.cuda_first and on_gpu:
        # A process that has already used the GPU: its CUDA context exists before the load,
        # so the timer holds the load alone (both modes pay the context otherwise).
        c0 = time.perf_counter()
        torch.empty(1, device=move_after or args.device)
        torch.cuda.synchronize()
        cuda_init_s = time.perf_counter() - c0
    pf0 = faults()
    t0 = time.perf_counter()
    with torch.inference_mode() if args.inference_mode else contextlib.nullcontext():
        model = load(args.path, **kwargs)
        if move_after is not None:
            model = model.to(move_after)
    if on_gpu:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    pf1 = faults()
    spanned = touch_pages(model)
    if on_gpu:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    pf2 = faults()
    rss_after = rss_bytes()
    peak = peak_rss_bytes()

    forward_s = forward_digest = None
    if args.forward:
        vocab = getattr(model.config, "vocab_size", None) or getattr(
            getattr(model.config, "get_text_config", lambda: model.config)(), "vocab_size", 1000)
        ids = (torch.arange(FORWARD_TOKENS, dtype=torch.long) * 7919 % int(vocab)).unsqueeze(0)
        device = next(model.parameters()).device
        with torch.no_grad():
            f0 = time.perf_counter()
            out = model(input_ids=ids.to(device))
            logits = out.logits if hasattr(out, "logits") else out[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward_s = time.perf_counter() - f0
        forward_digest = hashlib.sha256(memoryview(tensor_bytes(logits))).hexdigest()

    d0 = time.perf_counter()
    digest = weights_digest(model)
    ties = tie_digest(model)
    digest_s = time.perf_counter() - d0

    report = None
    if fasthug is not None:
        rep = fasthug.last_report()
        if rep is not None:
            report = {"path": rep.path, "reason": rep.reason, "bytes": rep.bytes,
                      "seconds": rep.seconds, "threads": rep.threads, "phases": dict(rep.phases),
                      "tensors_mapped": rep.tensors_mapped, "tensors_cast": rep.tensors_cast,
                      "tensors_to_device": rep.tensors_to_device,
                      "summary": rep.summary()}
        else:
            report = {"path": None, "reason": "no report: the load did not go through the patch"}

    return {
        "mode": args.mode,
        "path": args.path,
        "dtype_arg": args.dtype,
        "device": args.device,
        "quant": args.quant,
        "model_class": cls.__name__,
        "from_pretrained_s": t1 - t0,
        "ready_s": t2 - t0,
        "touch_s": t2 - t1,
        "forward_s": forward_s,
        "forward_digest": forward_digest,
        "import_s": import_s,
        # page faults (minor, major) taken by from_pretrained and by the touch after it:
        # faults in the touch mean from_pretrained returned with pages not yet mapped.
        "load_faults": [pf1[0] - pf0[0], pf1[1] - pf0[1]],
        "touch_faults": [pf2[0] - pf1[0], pf2[1] - pf1[1]],
        "digest_s": digest_s,
        "peak_rss_bytes": peak,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "cuda_init_s": cuda_init_s,
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "weight_bytes": weight_bytes(model),
        "spanned_bytes": spanned,
        "n_tensors": len(named_tensors(model)),
        "dtypes": dtype_counts(model),
        "digest": digest,
        "digest_algorithm": digest_algorithm(),
        "tie_digest": ties,
        "fasthug": report,
        "fasthug_imported": "fasthug_patch" in sys.modules,
        "fasthug_enable_env": os.environ.get("FASTHUG_ENABLE"),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "pid": os.getpid(),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasthug_patch.bench.trial", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("stock", "patched", "fasthug"), required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--dtype", default="default", help="bf16|fp16|fp32|auto|default (default: no dtype kwarg)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] (device_map), or cpu+cuda (load, then .to)")
    p.add_argument("--forward", action="store_true", help="also time a first forward pass")
    p.add_argument("--cuda-first", action="store_true",
                   help="create the CUDA context before the timer (recorded as cuda_init_s)")
    p.add_argument("--inference-mode", action="store_true", help="load inside torch.inference_mode()")
    p.add_argument("--quant", choices=("8bit", "4bit"), default=None, help="bitsandbytes quantization_config (4bit: nf4)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode != "patched" and ("fasthug_patch" in sys.modules or os.environ.get("FASTHUG_ENABLE") is not None):
        # Run as ``-m fasthug_patch.bench.trial``: the package is imported already. Start
        # over as a plain script in a fresh interpreter, with the switch variable removed.
        env = {k: v for k, v in os.environ.items() if k != "FASTHUG_ENABLE"}
        script = os.path.abspath(__file__)
        argv = list(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, script, *argv], env)
    # Keep stdout for the one JSON line: anything printed while loading goes to stderr.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        result = run_trial(args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if args.mode != "patched" and result["fasthug_imported"]:
        raise SystemExit(f"trial: {args.mode} mode imported fasthug_patch")
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip tearing down gigabytes of tensors: nothing is timed after this


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a script: its folder (fasthug_patch/bench) must not shadow other modules.
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.exit(main())
