"""Real multi-process jobs: torchrun with 2 and 3 CPU ranks on loopback share one reading
of the checkpoint, and every rank's model is bit-identical to a stock single-process load."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from tests.tiny import DTYPE_KWARG, model_digest, python_env, save_tiny_llama

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("ranks") / "ck"), max_shard_size="20KB")


@pytest.fixture(scope="module")
def stock_digest(sharded):
    import fasthug_patch

    with fasthug_patch.disabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(sharded, **{DTYPE_KWARG: torch.bfloat16})
    return model_digest(model)


def _torchrun(checkpoint, out, world, mode, env=None):
    os.makedirs(out, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               os.path.join(os.path.dirname(__file__), "rank_worker.py"), checkpoint, str(out), mode]
    # FASTHUG_IO=read: the tiny files are read (and so shared) like a large cold checkpoint's.
    proc = subprocess.run(command, env=python_env({"FASTHUG_ENABLE": "1", "FASTHUG_IO": "read", **(env or {})}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.load(open(name)) for name in sorted(glob.glob(os.path.join(out, "rank*.json")))]
    assert sorted(r["rank"] for r in results) == list(range(world))
    return results


def _checkpoint_bytes(directory):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(directory, "*.safetensors")))


@pytest.mark.parametrize("mode", ["env", "gloo"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_the_checkpoint_once_and_all_load_the_stock_model(sharded, stock_digest, tmp_path, world, mode):
    results = _torchrun(sharded, tmp_path / "out", world, mode)
    for result in results:
        assert result["path"] == "fast", result
        assert result["digest"] == stock_digest, result
        assert result["ranks"].startswith(f"shared: rank {result['rank']} "), result
    # Read once in all: whoever started first read the chunks the others had not claimed yet.
    assert sum(r["bytes_filled"] for r in results) == _checkpoint_bytes(sharded)


def test_sharing_off_every_rank_reads_everything(sharded, stock_digest, tmp_path):
    results = _torchrun(sharded, tmp_path / "out", 2, "env", {"FASTHUG_DIST": "0"})
    for result in results:
        assert result["digest"] == stock_digest and result["path"] == "fast"
        assert result["bytes_filled"] == _checkpoint_bytes(sharded)
        assert "FASTHUG_DIST=0" in result["ranks"]


def test_fsdp_cpu_ram_efficient_loading_runs_stock_with_the_reason(sharded, stock_digest, tmp_path):
    results = _torchrun(sharded, tmp_path / "out", 2, "gloo",
                        {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})
    for result in results:
        assert result["path"] == "fallback" and "FSDP cpu-RAM-efficient" in result["reason"], result
    assert results[0]["digest"] == stock_digest  # local rank 0 loads the weights
