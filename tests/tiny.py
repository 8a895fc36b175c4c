"""Tiny real checkpoints and a fresh-interpreter runner, for tests outside the sweep."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
DTYPE_KWARG = "dtype" if IS_V5 else "torch_dtype"


def tiny_llama_config(**overrides):
    params = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    params.update(overrides)
    return transformers.LlamaConfig(**params)


# Layouts of the shared good checkpoints (conftest.py's ``good``): kind -> save_tiny_llama kwargs.
TINY_LAYOUTS = {
    "single": {},
    "sharded": {"max_shard_size": "20KB"},  # three safetensors shards
    "bin": {"bin_format": True},
    "bin-sharded": {"max_shard_size": "20KB", "bin_format": True},
}


def save_tiny_llama(path: str, dtype=torch.bfloat16, seed: int = 0, bin_format: bool = False, **save_kwargs) -> str:
    """A ~60 KB Llama checkpoint; ``max_shard_size="20KB"`` gives 3 shards, ``bin_format``
    pytorch_model*.bin files (torch.save, as 4.x writes them) instead of safetensors."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(), **{DTYPE_KWARG: dtype})
    model.save_pretrained(path, **save_kwargs)
    if bin_format:
        from pathlib import Path

        from tests.parity import _convert_to_bin

        _convert_to_bin(Path(path))
    return path


def python_env(env: dict | None = None) -> dict:
    """The environment of a fresh test interpreter: this checkout first on the path, no
    FASTHUG_* settings from the outside, then ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTHUG_")}
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return full_env


def run_python(code: str, env: dict | None = None, cwd: str | None = None, timeout: int = 300, args=(), **popen):
    """Run ``code`` in a fresh interpreter; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=python_env(env), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, **popen,
    )


def assert_exited_normally(proc) -> None:
    """The interpreter ended by itself (any exit status), not killed by a signal (SIGBUS, SIGSEGV...)."""
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"process killed by {name}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


def json_lines(text: str) -> list[dict]:
    """The JSON objects a child printed one per line (other lines skipped)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def state_bytes(model) -> dict[str, tuple]:
    """name -> (dtype, shape, raw bytes) for bitwise comparison."""
    out = {}
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().contiguous().reshape(-1)
        out[name] = (tensor.dtype, tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes())
    return out


def model_digest(model) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, (dtype, shape, raw) in sorted(state_bytes(model).items()):
        digest.update(f"{name}|{dtype}|{shape}|".encode() + raw)
    return digest.hexdigest()


# -- taking checkpoints apart, for broken variants of good ones --------------------------

def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def read_safetensors_raw(path: str) -> tuple[dict, bytes]:
    """(header dict including __metadata__, data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_safetensors_raw(path: str, header: dict, data: bytes, header_len: int | None = None, pad_to: int = 8) -> str:
    """Write ``header`` and ``data`` as a safetensors file, as they are (no validation);
    ``header_len`` overrides the length field, ``pad_to`` the header's space padding."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad_to)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def data_offset(path: str) -> int:
    """Where a safetensors file's data region begins."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def edit_index(directory: str, edit, name: str = "model.safetensors.index.json") -> dict:
    """Apply ``edit(weight_map)`` (in place) to a sharded checkpoint's index; returns the map."""
    path = os.path.join(directory, name)
    with open(path) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f, indent=2)
    return index["weight_map"]
