"""Seeded random checkpoints of real architectures, built locally and cached.

No hub access is needed: a config class gives the architecture, ``from_config`` gives
random weights (seeded), ``save_pretrained`` writes the checkpoint.

Building is idempotent: the checkpoint is written to a temporary sibling directory, a
marker file recording the spec is written last, and the directory is renamed into place
(atomic on one filesystem). A directory whose marker matches the requested spec is
returned as is. A file lock keeps two processes from building the same one twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MARKER = ".fasthug_checkpoint.json"
CACHE_VAR = "FASTHUG_CACHE"
DEMO_SIZE_VAR = "FASTHUG_DEMO_SIZE"  # for tests: e.g. "tiny"; the demo is "1b"
DEFAULT_SEED = 1234

# Llama-family hyperparameters. "tiny" is for tests; the others mirror real models
# (125m ~ GPT-2 small sized Llama, 1b ~ TinyLlama-1.1B, 3b ~ Llama-3.2-3B body with a
# 32k vocabulary and untied head).
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                 tie_word_embeddings=False),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048,
                 tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
               tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
               tie_word_embeddings=False),
}
# 1b with its head tied to the embeddings (as Gemma, OPT, Llama-3.2-1B): the one layout
# fasthug 0.0.6 loads, so the suite can time it beside stock and the plugin.
SIZES["1b-tied"] = dict(SIZES["1b"], tie_word_embeddings=True)
# Llama-2-7B's shape (6.7B parameters, 13.5 GB in bf16): the GPU issue's ~14 GB checkpoint.
SIZES["7b"] = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                   tie_word_embeddings=False)
# Sizes saved sharded (with an index) unless shard_size is given.
DEFAULT_SHARD = {"3b": "2GB", "7b": "5GB"}

# kind -> transformers config class name (all share Llama's hyperparameter names).
KINDS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def dtype_name(dtype) -> str:
    """"bf16" / torch.bfloat16 / "bfloat16" -> "bfloat16"."""
    text = str(dtype).removeprefix("torch.")
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; one of {sorted(set(DTYPES))}") from None


def spec(kind: str, size: str, dtype, shard_size=None, seed: int = DEFAULT_SEED) -> dict:
    """The identity of a checkpoint: what the marker file records and compares."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {sorted(KINDS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {list(SIZES)}")
    if shard_size is None:
        shard_size = DEFAULT_SHARD.get(size)
    return {"kind": kind, "size": size, "dtype": dtype_name(dtype),
            "shard_size": None if shard_size is None else str(shard_size), "seed": int(seed),
            "config": SIZES[size]}


def param_count(size: str) -> int:
    """Parameters of a Llama of ``size`` (no biases, untied unless configured)."""
    c = SIZES[size]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * layer + v * h * (1 if c["tie_word_embeddings"] else 2) + h


def estimated_bytes(size: str, dtype) -> int:
    return param_count(size) * _BYTES[dtype_name(dtype)]


def read_marker(directory) -> dict | None:
    try:
        with open(os.path.join(directory, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _same_spec(marker: dict | None, want: dict) -> bool:
    return marker is not None and {k: marker.get(k) for k in want} == want


def build_checkpoint(kind: str, size: str, dtype, out_dir, shard_size=None, seed: int = DEFAULT_SEED,
                     progress: bool = True) -> str:
    """Build (once) a seeded random ``kind``/``size`` checkpoint in ``dtype`` at ``out_dir``.

    Returns ``out_dir``. If ``out_dir`` already holds a checkpoint built with the same spec
    (marker file), nothing is built. If it holds one with another spec, it is replaced. A
    directory without the marker is not touched (FileExistsError).
    """
    want = spec(kind, size, dtype, shard_size, seed)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if _same_spec(read_marker(out_dir), want):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(out_dir + ".lock"):
        marker = read_marker(out_dir)
        if _same_spec(marker, want):  # built by another process while we waited
            return out_dir
        if os.path.exists(out_dir) and marker is None:
            raise FileExistsError(f"{out_dir} exists and is not a fasthug_patch bench checkpoint; "
                                  "refusing to overwrite it")
        need = int(estimated_bytes(size, want["dtype"]) * 1.05) + (64 << 20)
        free = shutil.disk_usage(parent).free
        if free < need:
            raise OSError(f"not enough disk space in {parent} for the {size} checkpoint: "
                          f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
        try:
            if progress:
                print(f"fasthug_patch: building {kind}-{size} ({want['dtype']}, seed {seed}, "
                      f"~{estimated_bytes(size, want['dtype']) / 1e9:.2f} GB) in {out_dir} ...",
                      flush=True)
            began = time.perf_counter()
            _write_checkpoint(want, tmp)
            info = dict(want, built_seconds=round(time.perf_counter() - began, 2), **_versions())
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump(info, f, indent=1)
            _move_into_place(tmp, out_dir)
            if progress:
                print(f"fasthug_patch: built in {info['built_seconds']:.1f}s", flush=True)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, moving aside (then deleting) what was
    there: ours, of another spec."""
    if os.path.exists(out_dir):
        trash = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(trash, "old"))
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, out_dir)


def _write_checkpoint(want: dict, directory: str) -> None:
    import torch
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    config_cls = getattr(transformers, KINDS[want["kind"]])
    config = config_cls(**want["config"])
    config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    model_cls = getattr(transformers, config.architectures[0])
    dtype = getattr(torch, want["dtype"])
    torch.manual_seed(want["seed"])
    # Built in the target dtype directly: peak memory is one copy of the weights.
    kwargs = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    # On a GPU machine, initialise there (seconds instead of minutes for 7b on the CPU).
    build_on = "cuda" if torch.cuda.is_available() and want["size"] not in ("tiny", "125m") else "cpu"
    with torch.device(build_on):
        model = model_cls._from_config(config, **kwargs)
    gen = torch.Generator().manual_seed(want["seed"] + 1)
    with torch.no_grad():
        # Norm weights start at all-ones: give them seeded noise, so no tensor holds a
        # value an initialiser would reproduce by accident (cheap: they are 1-D).
        for param in model.parameters():
            if param.dim() == 1 and param.is_floating_point():
                param.add_((torch.randn(param.shape, generator=gen) * 0.02).to(param.device, param.dtype))
    model.eval()
    save = {}
    if want["shard_size"] is not None:
        save["max_shard_size"] = want["shard_size"]
    elif want["size"] != "tiny":
        save["max_shard_size"] = "1000GB"  # one file, whatever the library default
    model.save_pretrained(directory, **save)
    del model


def _versions() -> dict:
    import torch
    import transformers

    return {"built_with_transformers": transformers.__version__, "built_with_torch": torch.__version__}


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_dir() -> str:
    """$FASTHUG_CACHE, else ~/.cache/fasthug_patch."""
    root = os.environ.get(CACHE_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "fasthug_patch")
    return os.path.abspath(root)


def cached_checkpoint(kind: str = "llama", size: str = "1b", dtype="bf16", shard_size=None,
                      seed: int = DEFAULT_SEED, progress: bool = True) -> str:
    """A checkpoint under :func:`cache_dir`, built on first use."""
    s = spec(kind, size, dtype, shard_size, seed)
    name = f"{kind}-{size}-{s['dtype']}" + (f"-shard{s['shard_size']}" if s["shard_size"] else "")
    if seed != DEFAULT_SEED:
        name += f"-seed{seed}"
    return build_checkpoint(kind, size, dtype, os.path.join(cache_dir(), name), shard_size, seed,
                            progress=progress)


def demo_checkpoint(progress: bool = True) -> str:
    """The ~1.1B-parameter bf16 Llama of ``fasthug-patch demo`` (2.2 GB), built once.

    $FASTHUG_DEMO_SIZE picks another size (tests use "tiny")."""
    return cached_checkpoint("llama", os.environ.get(DEMO_SIZE_VAR) or "1b", "bf16", progress=progress)


def weight_files(path) -> list[str]:
    """Every regular file of a checkpoint directory (recursively, symlinks resolved), or
    the file itself; sorted, empty files left out."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [os.path.realpath(path)]
    found = set()
    for root, _dirs, files in os.walk(path, followlinks=True):
        for name in files:
            full = os.path.realpath(os.path.join(root, name))
            if os.path.isfile(full) and os.path.getsize(full) > 0:
                found.add(full)
    return sorted(found)


def weight_bytes(path) -> int:
    """The total size of :func:`weight_files`: the checkpoint's bytes on disk."""
    return sum(os.path.getsize(f) for f in weight_files(path))


def quantization_method(path) -> str | None:
    """The quant_method a checkpoint directory's config.json was saved with (a
    pre-quantised checkpoint: "bitsandbytes", ...), or None."""
    try:
        with open(os.path.join(os.fspath(path), "config.json")) as handle:
            quant = json.load(handle).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method) if method else None


def resolve_local(model_or_path) -> str | None:
    """A local directory for ``model_or_path``: itself, or the hub cache's snapshot
    (without downloading). None when there is none."""
    text = os.fspath(model_or_path)
    if os.path.exists(text):
        return os.path.abspath(text)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(text, local_files_only=True)
    except Exception:
        return None


def quantized_checkpoint(source: str, quant: str, python: str = sys.executable, progress: bool = True) -> str:
    """``source`` quantised by stock transformers + bitsandbytes (``quant``: "8bit" or
    "4bit" = nf4) on the CPU and written with ``save_pretrained`` beside it, once, by
    ``python`` (so by the transformers line that will read it). Built and marked like
    build_checkpoint's checkpoints: in a temporary directory, marker last, renamed into place."""
    from fasthug_patch.bench.trial import BNB_SETTINGS

    out_dir = f"{os.path.abspath(source).rstrip(os.sep)}-bnb-{quant}"
    want = {"source": source, "settings": BNB_SETTINGS[quant]}
    with _file_lock(out_dir + ".lock"):
        marker = read_marker(out_dir)
        if _same_spec(marker, want):
            return out_dir
        if os.path.exists(out_dir) and marker is None:
            raise FileExistsError(f"{out_dir} exists and is not a fasthug_patch bench checkpoint; "
                                  "refusing to overwrite it")
        if progress:
            print(f"fasthug_patch: quantising {source} ({quant}) into {out_dir} ...", flush=True)
        code = (
            "import json, sys, transformers\n"
            "source, out, marker, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
            "config = transformers.BitsAndBytesConfig(**settings)\n"
            "model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config, "
            "device_map='cpu')\n"
            "model.save_pretrained(out)\n"
            "json.dump({'source': source, 'settings': settings, 'built_with_transformers': "
            "transformers.__version__}, open(marker, 'w'))\n"
        )
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=os.path.dirname(out_dir))
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("FASTHUG_")}  # stock, unpatched
            subprocess.run([python, "-c", code, source, tmp, os.path.join(tmp, MARKER),
                            json.dumps(BNB_SETTINGS[quant])], check=True, env=env)
            _move_into_place(tmp, out_dir)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
