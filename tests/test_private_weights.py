"""A fast-loaded model's weights are its own, as stock's are.

Zero-copy weights are views of a private (copy-on-write) mapping of the checkpoint: writing
into them, as training does, must reach neither the file nor any other model loaded from
it, before or after. A shared mapping, or one mapping reused across loads, would pass
every parity check of a freshly loaded model and still leak one model's updates into the
next load; test_engine checks the file for one engine view, this the whole-model cases.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import transformers

import fasthug_patch
from tests.architectures import LEGACY_STATE_DICT_LOAD
from tests.parity import checkpoint_files, dtype_kwargs
from tests.tiny import TINY_LAYOUTS

# dtype asked for: bf16 over the bf16 checkpoints (zero-copy views), fp32 (casts)
DTYPES = {"zero-copy": torch.bfloat16, "cast": torch.float32}


def _digest(directory: str) -> str:
    digest = hashlib.sha256()
    for path in checkpoint_files(directory):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _load_fast(path: str, dtype):
    with fasthug_patch.enabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype))
    report = fasthug_patch.last_report()
    assert report.path == "fast", report
    return model, report


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _differing(model, snapshot: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in model.state_dict().items() if not torch.equal(t, snapshot[name])]


@pytest.mark.parametrize("how", sorted(DTYPES))
@pytest.mark.parametrize("layout", sorted(TINY_LAYOUTS))
def test_writes_to_a_loaded_model_reach_neither_its_files_nor_other_loads(derive, layout, how):
    if LEGACY_STATE_DICT_LOAD and layout.startswith("bin"):
        pytest.skip("before 4.51 stock loads .bin shards itself (torch.load(mmap=True)); not the fast path")
    path, dtype = derive(layout, "written"), DTYPES[how]  # a copy: a regression would write into it
    before = _digest(path)
    with fasthug_patch.disabled():
        stock = transformers.AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype))
    expected = _snapshot(stock)

    written, report = _load_fast(path, dtype)
    if how == "zero-copy" and layout in ("single", "sharded"):
        assert report.tensors_mapped > 0, "expected zero-copy views of the mapping"
    bystander, _ = _load_fast(path, dtype)

    with torch.no_grad():
        for param in written.parameters():
            param.add_(1)  # an in-place update, as an optimiser step makes
    assert _differing(written, expected), "the writes did not land"

    assert _digest(path) == before, "writing into a loaded model changed its checkpoint files"
    assert not _differing(bystander, expected), "a model loaded earlier saw another model's writes"
    later, _ = _load_fast(path, dtype)
    assert not _differing(later, expected), "a later load saw an earlier model's writes"
