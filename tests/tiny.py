"""Tiny real checkpoints and a fresh-interpreter runner, for tests outside the sweep."""

from __future__ import annotations

import os
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


def save_tiny_llama(path: str, dtype=torch.bfloat16, seed: int = 0, **save_kwargs) -> str:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama_config(), **{DTYPE_KWARG: dtype})
    model.save_pretrained(path, **save_kwargs)
    return path


def run_python(code: str, env: dict | None = None, cwd: str | None = None, timeout: int = 300):
    """Run ``code`` in a fresh interpreter; returns CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTHUG_")}
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
    )


def state_bytes(model) -> dict[str, tuple]:
    """name -> (dtype, shape, raw bytes) for bitwise comparison."""
    out = {}
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().contiguous().reshape(-1)
        out[name] = (tensor.dtype, tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes())
    return out
