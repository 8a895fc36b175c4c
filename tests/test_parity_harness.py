"""Self-tests of the parity harness: ``assert_same_model`` must pass on two stock loads
of one checkpoint and must catch every deliberate perturbation of the second model.

Runs stock loads only (the plugin is switched off for them when it is imported), so it
checks the harness even while the plugin does not work.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import transformers

from tests.architectures import ARCHITECTURES, IS_V5, catalogue, get
from tests.parity import (
    assert_same_model,
    build_checkpoint,
    dtype_kwargs,
    edit_safetensors,
    load_model,
    model_differences,
    safetensors_keys,
    tensors_bitwise_equal,
)


def _stock():
    fh = sys.modules.get("fasthug_patch")
    return fh.disabled() if fh is not None else contextlib.nullcontext()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("harness")
    return {name: build_checkpoint(get(name), root / name) for name in ("gpt2", "t5", "llama", "resnet")}


def load_twice(ckpts, name, **kwargs):
    arch = get(name)
    with _stock():
        a, _ = load_model(arch, ckpts[name], **kwargs)
        b, _ = load_model(arch, ckpts[name], **kwargs)
    return arch, a, b


def assert_caught(stock, fast, inputs, *needles):
    with pytest.raises(AssertionError) as err:
        assert_same_model(stock, fast, inputs)
    text = str(err.value)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


# --------------------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("name", ["gpt2", "t5", "llama", "resnet"])
def test_two_stock_loads_are_identical(ckpts, name):
    arch, a, b = load_twice(ckpts, name)
    assert_same_model(a, b, arch.make_inputs(a.config))


def test_identical_fp16_loads_keep_fp32(ckpts):
    arch, a, b = load_twice(ckpts, "t5", **dtype_kwargs(torch.float16))
    assert a.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # keep_in_fp32 (fp16 loads only on 4.57)
    assert a.encoder.block[0].layer[1].DenseReluDense.wi.weight.dtype == torch.float16
    assert_same_model(a, b, arch.make_inputs(a.config))


def test_nan_bits_compare_equal():
    x = torch.tensor([1.0, float("nan"), -0.0])
    assert tensors_bitwise_equal(x, x.clone())
    assert not tensors_bitwise_equal(x, torch.tensor([1.0, float("nan"), 0.0]))  # -0.0 vs 0.0
    other_nan = x.clone()
    other_nan.view(torch.int32)[1] ^= 1  # another NaN payload
    assert torch.isnan(other_nan[1])
    assert not tensors_bitwise_equal(x, other_nan)
    assert tensors_bitwise_equal(torch.tensor(3.0), torch.tensor(3.0))  # 0-dim
    assert not tensors_bitwise_equal(torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- perturbations


def test_catches_one_flipped_bit(ckpts):
    arch, a, b = load_twice(ckpts, "llama")
    with torch.no_grad():
        w = b.model.layers[1].mlp.down_proj.weight
        w.view(torch.int32).view(-1)[5] ^= 1  # lowest mantissa bit of one element
    assert_caught(a, b, arch.make_inputs(a.config), "model.layers.1.mlp.down_proj.weight: values differ")


def test_catches_perturbed_weight_without_inputs(ckpts):
    _, a, b = load_twice(ckpts, "gpt2")
    with torch.no_grad():
        b.transformer.h[0].attn.c_attn.weight[0, 0] += 1.0  # Conv1D weight
    assert_caught(a, b, None, "transformer.h.0.attn.c_attn.weight: values differ")


def test_catches_untied_weight(ckpts):
    arch, a, b = load_twice(ckpts, "gpt2")
    assert a.lm_head.weight is a.transformer.wte.weight
    b.lm_head.weight = torch.nn.Parameter(b.transformer.wte.weight.detach().clone())  # same values, untied
    assert_caught(a, b, arch.make_inputs(a.config), "tied parameter groups differ", "memory-alias groups differ")


def test_catches_untied_seq2seq_embeddings(ckpts):
    arch, a, b = load_twice(ckpts, "t5")
    b.encoder.embed_tokens.weight = torch.nn.Parameter(b.shared.weight.detach().clone())
    assert_caught(a, b, arch.make_inputs(a.config), "tied parameter groups differ")


def test_catches_changed_dtype(ckpts):
    arch, a, b = load_twice(ckpts, "llama")
    b.model.norm.to(torch.bfloat16)
    assert_caught(a, b, arch.make_inputs(a.config), "model.norm.weight: tensor properties differ")


def test_catches_keep_in_fp32_not_kept(ckpts):
    arch, a, b = load_twice(ckpts, "t5", **dtype_kwargs(torch.float16))
    b.decoder.block[0].layer[2].DenseReluDense.wo.to(torch.float16)
    assert_caught(a, b, arch.make_inputs(a.config), "decoder.block.0.layer.2.DenseReluDense.wo.weight")


def test_catches_different_stride(ckpts):
    _, a, b = load_twice(ckpts, "llama")
    w = b.model.layers[0].self_attn.q_proj.weight
    b.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(w.detach().t().contiguous().t())
    text = assert_caught(a, b, None, "q_proj.weight: tensor properties differ")
    assert "stride" in text


def test_catches_meta_device(ckpts):
    _, a, b = load_twice(ckpts, "llama")
    w = b.model.layers[0].mlp.up_proj.weight
    b.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(w.shape, device="meta"))
    assert_caught(a, b, None, "up_proj.weight: tensor properties differ", "device")


def test_catches_requires_grad(ckpts):
    _, a, b = load_twice(ckpts, "llama")
    b.model.norm.weight.requires_grad_(False)
    assert_caught(a, b, None, "model.norm.weight: requires_grad")


def test_catches_buffer_change(ckpts):
    arch, a, b = load_twice(ckpts, "resnet")
    bn = next(m for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.num_batches_tracked += 1  # int64 persistent buffer
    assert_caught(a, b, arch.make_inputs(a.config), "num_batches_tracked: values differ")


def test_catches_non_persistent_buffer_change(ckpts):
    _, a, b = load_twice(ckpts, "llama")
    rope = b.model.rotary_emb
    with torch.no_grad():
        rope.inv_freq.mul_(1.0001)
    assert_caught(a, b, None, "non-persistent buffer model.rotary_emb.inv_freq differs")


def test_catches_missing_and_extra_state_keys(ckpts):
    _, a, b = load_twice(ckpts, "llama")
    b.model.register_buffer("parity_extra", torch.zeros(2))
    assert_caught(a, b, None, "state_dict keys differ", "parity_extra")


def test_catches_output_only_difference(ckpts):
    arch, a, b = load_twice(ckpts, "llama")
    b.lm_head.register_forward_hook(lambda mod, args, out: out + 1e-3)
    assert_caught(a, b, arch.make_inputs(a.config), "out.logits: outputs differ")


def test_catches_forward_error_mismatch(ckpts):
    arch, a, b = load_twice(ckpts, "llama")

    def boom(mod, args):
        raise RuntimeError("boom")

    b.model.norm.register_forward_pre_hook(boom)
    assert_caught(a, b, arch.make_inputs(a.config), "forward: stock raised None, fast raised RuntimeError")


def test_catches_loading_info_difference(ckpts, tmp_path):
    import shutil

    arch = get("llama")
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["llama"], broken)
    edit_safetensors(broken / "model.safetensors", drop=["model.layers.0.mlp.up_proj.weight"])
    with _stock():
        a, info_a = load_model(arch, ckpts["llama"])
        b, info_b = load_model(arch, broken)
    assert info_b["missing_keys"]
    # weights differ too (seeded init != checkpoint values), but the info must be named
    assert_caught(a, b, None, "loading info 'missing_keys'")
    # and with identical weights, a differing info alone is caught
    _, c, d = load_twice(ckpts, "llama")
    d._parity_loading_info = {**c._parity_loading_info, "unexpected_keys": ["bogus"]}
    assert_caught(c, d, None, "loading info 'unexpected_keys'")


def test_catches_generation_config_difference(ckpts):
    _, a, b = load_twice(ckpts, "gpt2")
    b.generation_config.max_length = 7
    assert_caught(a, b, None, "generation_config differs", "max_length")


def test_catches_config_difference(ckpts):
    _, a, b = load_twice(ckpts, "llama")
    b.config.rms_norm_eps = 1e-3
    assert_caught(a, b, None, "config differs", "rms_norm_eps")


def test_catches_model_class_difference(ckpts):
    with _stock():
        a, _ = load_model(get("llama"), ckpts["llama"])
        b, _ = load_model("AutoModel", ckpts["llama"])
    assert any("model class" in p for p in model_differences(a, b))


# --------------------------------------------------------------------------- catalogue / helpers


def test_catalogue_shape():
    assert len(catalogue()) >= 45
    names = [a.name for a in ARCHITECTURES]  # older lines lack some (granite, qwen3 before 4.45)
    required = {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox", "gptj",
        "opt", "bloom", "falcon", "stablelm", "starcoder2", "olmo", "cohere", "granite", "mixtral",
        "qwen2_moe", "gpt_bigcode", "codegen", "t5", "bart", "mbart", "pegasus", "marian", "whisper",
        "bert", "roberta", "distilbert", "albert", "electra", "deberta_v2", "xlm_roberta", "vit", "deit",
        "convnext", "swin", "resnet", "beit", "wav2vec2", "hubert",
    }
    assert required <= set(names), required - set(names)
    for tag in ("tied", "keep_fp32", "conv1d", "moe", "seq2seq", "vision", "audio"):
        assert any(tag in a.tags for a in ARCHITECTURES), tag


def test_inputs_are_deterministic():
    for arch in catalogue():
        config = arch.make_config()
        x, y = arch.make_inputs(config), arch.make_inputs(config)
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), (arch.name, k)


def test_edit_safetensors_keeps_format_metadata(ckpts, tmp_path):
    import shutil

    from safetensors import safe_open

    d = tmp_path / "c"
    shutil.copytree(ckpts["llama"], d)
    path = d / "model.safetensors"
    edit_safetensors(path, drop=["model.norm.weight"], add={"extra.weight": torch.ones(2)})
    keys = safetensors_keys(path)
    assert "model.norm.weight" not in keys and "extra.weight" in keys
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_dtype_kwargs_version_aware():
    assert dtype_kwargs(torch.float16) == ({"dtype": torch.float16} if IS_V5 else {"torch_dtype": torch.float16})
    from tests.parity import DEFAULT

    assert dtype_kwargs(DEFAULT) == {}
