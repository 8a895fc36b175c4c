"""Catalogue of tiny, real transformers architectures for the parity sweep.

Every entry builds (random weights, nothing downloaded) and loads with stock
``from_pretrained`` on BOTH transformers 4.57.x and 5.x.  Models are a few hundred
kB at most: hidden sizes 16-64, one or two layers, vocabularies of 128-256.

An entry is an :class:`Arch`:

* ``name``          unique id used in test ids
* ``make_config``   () -> a fresh ``PretrainedConfig`` (config classes are imported
                    lazily so importing this module stays cheap)
* ``auto_class``    name of the ``transformers`` Auto class used to build and load
* ``make_inputs``   (config) -> dict of deterministic (seeded) forward inputs
* ``tags``          features the entry exercises: ``tied`` (tied input/output
                    embeddings), ``keep_fp32`` (declares ``_keep_in_fp32_modules``),
                    ``conv1d`` (GPT-2 style ``Conv1D``), ``moe`` (experts; transformers
                    5.x fuses them at load time through its weight-conversion
                    machinery), ``weight_norm`` (parametrised conv, stored as
                    ``weight_g``/``weight_v`` or ``parametrizations...original0/1``),
                    ``int_buffer`` (persistent integer buffers such as BatchNorm's
                    ``num_batches_tracked``), ``seq2seq``, ``vision``, ``audio``,
                    ``encoder``, ``causal``
* ``notes``         anything version specific, free text

Use :func:`catalogue` for the entries that work on the installed transformers
version (entries can carry ``min_version``/``max_version`` gates; none of the
current ones need one: an entry whose config class a line lacks is skipped there, as
5.24's exaone, dory, lara_mini and sarvam_moe are before 5.24).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers
from packaging import version

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
IS_V5 = TRANSFORMERS_VERSION.major >= 5
# Before 4.51 the plugin answers stock's load_state_dict with zero-copy views (v4_legacy.py)
# and stock assigns and casts them itself; from 4.51 the engine places and casts each tensor.
LEGACY_STATE_DICT_LOAD = TRANSFORMERS_VERSION.release[:2] < (4, 51)

VOCAB = 128
SEQ_LEN = 8
BATCH = 2


# --------------------------------------------------------------------------- model entries


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: Callable[[], "transformers.PretrainedConfig"]
    auto_class: str
    make_inputs: Callable[["transformers.PretrainedConfig"], dict]
    tags: frozenset = field(default_factory=frozenset)
    notes: str = ""
    min_version: str | None = None  # inclusive, e.g. "5.0"
    max_version: str | None = None  # exclusive

    @property
    def auto(self):
        return getattr(transformers, self.auto_class)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

    def supported(self) -> bool:
        """Buildable on the installed transformers: inside the version gates, and its config
        class and Auto class exist there (older lines lack newer architectures)."""
        config_class = getattr(self.make_config, "config_class", None)
        if config_class and not hasattr(transformers, config_class):
            return False
        if not hasattr(transformers, self.auto_class):
            return False
        if self.min_version and TRANSFORMERS_VERSION < version.parse(self.min_version):
            return False
        if self.max_version and TRANSFORMERS_VERSION >= version.parse(self.max_version):
            return False
        return True

    @property
    def family(self) -> str:
        """One word for docs/compatibility.md's matrix: the first of these tags it has."""
        for tag in ("moe", "seq2seq", "audio", "vision", "encoder", "causal"):
            if tag in self.tags:
                return tag
        return "other"

    def __repr__(self) -> str:  # short test ids / assertion messages
        return f"Arch({self.name})"


def _cfg(class_name: str, **kwargs):
    """Deferred config constructor: ``_cfg("LlamaConfig", hidden_size=32)``."""

    def make():
        return getattr(transformers, class_name)(**kwargs)

    make.__qualname__ = f"{class_name}(...)"
    make.config_class = class_name
    return make


# --------------------------------------------------------------------------- inputs


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _ids(vocab: int, seed: int, seq: int = SEQ_LEN, low: int = 3) -> torch.Tensor:
    # ids >= 3 avoid pad/bos/eos so no model masks anything surprising
    return torch.randint(low, vocab, (BATCH, seq), generator=_gen(seed), dtype=torch.long)


def causal_inputs(config) -> dict:
    return {"input_ids": _ids(config.vocab_size, 1), "use_cache": False}


def encoder_inputs(config) -> dict:
    ids = _ids(config.vocab_size, 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def seq2seq_inputs(config) -> dict:
    ids = _ids(config.vocab_size, 3)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": _ids(config.vocab_size, 4, seq=5),
        "use_cache": False,
    }


def image_inputs(config) -> dict:
    size = getattr(config, "image_size", 32)
    if isinstance(size, (list, tuple)):
        size = size[0]
    chans = getattr(config, "num_channels", 3)
    return {"pixel_values": torch.randn(BATCH, chans, size, size, generator=_gen(5))}


def audio_inputs(config) -> dict:
    return {"input_values": torch.randn(BATCH, 1600, generator=_gen(6)) * 0.1}


def whisper_inputs(config) -> dict:
    feats = torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions, generator=_gen(7))
    return {"input_features": feats, "decoder_input_ids": _ids(config.vocab_size, 8, seq=5), "use_cache": False}


def whisper_cls_inputs(config) -> dict:
    feats = torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions, generator=_gen(9))
    return {"input_features": feats}


def clip_inputs(config) -> dict:
    ids = _ids(config.text_config.vocab_size, 10)
    size = config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(BATCH, 3, size, size, generator=_gen(11)),
    }


def text_only_inputs(config) -> dict:
    """Text tokens for an image-text model, below its image/video token ids (100-102 in
    the catalogue's configs), so the forward runs the language model alone; the vision
    tower's weights are still compared tensor by tensor."""
    return {"input_ids": _ids(100, 12), "use_cache": False}


# --------------------------------------------------------------------------- common kwargs

# special token ids well inside every vocabulary (several configs default to
# ids like 32000 or 50256, which would index out of a 128-row embedding)
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Llama-like decoder (hidden 32, 2 layers, 4 heads, GQA 2 kv heads)
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **TOK,
)

# Qwen3-Next's hybrid layers (experts beside gated delta-net linear attention), which
# 5.24's lara_mini shares
QWEN3_NEXT_LIKE = dict(
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)

BART_LIKE = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
    **TOK,
)

T5_LIKE = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

BERT_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=66,  # roberta-style position ids start at pad+1
    type_vocab_size=2,
)

VIT_LIKE = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_labels=3,
)

W2V_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=32,
    num_labels=3,
    classifier_proj_size=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# vision tower of the composite (image-text, contrastive) entries
VISION_TOWER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
)

CLM = "AutoModelForCausalLM"
S2S = "AutoModelForSeq2SeqLM"
MLM = "AutoModelForMaskedLM"
IMG = "AutoModelForImageClassification"
IMAGE_TEXT = "AutoModelForImageTextToText"


def _arch(name, make_config, auto_class, make_inputs, tags=(), notes="", **kw) -> Arch:
    return Arch(name, make_config, auto_class, make_inputs, frozenset(tags), notes, **kw)


# --------------------------------------------------------------------------- the catalogue

ARCHITECTURES: list[Arch] = [
    # ---------------------------------------------------------------- causal LMs
    _arch("llama", _cfg("LlamaConfig", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch(
        "llama_tied",
        _cfg("LlamaConfig", tie_word_embeddings=True, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "tied"},
        notes="tied lm_head; saved file holds only model.embed_tokens.weight",
    ),
    _arch("mistral", _cfg("MistralConfig", sliding_window=16, **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch("qwen2", _cfg("Qwen2Config", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch("qwen3", _cfg("Qwen3Config", head_dim=8, **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch(
        "gemma",
        _cfg("GemmaConfig", head_dim=8, tie_word_embeddings=True, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "gemma2",
        _cfg(
            "Gemma2Config",
            head_dim=8,
            sliding_window=16,
            query_pre_attn_scalar=8,
            tie_word_embeddings=True,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "gemma3_text",
        _cfg(
            "Gemma3TextConfig",
            head_dim=8,
            sliding_window=16,
            query_pre_attn_scalar=8,
            tie_word_embeddings=True,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "phi",
        _cfg(
            "PhiConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
            max_position_embeddings=64,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal"},
    ),
    _arch("phi3", _cfg("Phi3Config", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch(
        "gpt2",
        _cfg("GPT2Config", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, **TOK),
        CLM,
        causal_inputs,
        {"causal", "tied", "conv1d"},
        notes="Conv1D (weight stored [in, out]); lm_head tied to wte; 4.57: the bare GPT2Model "
        "(not GPT2LMHeadModel) sets _supports_param_buffer_assignment = False",
    ),
    _arch(
        "gpt_neox",
        _cfg(
            "GPTNeoXConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal"},
        notes="5.x: the module's embed_out is named lm_head (file keeps embed_out.weight, renamed on load)",
    ),
    _arch(
        "gptj",
        _cfg("GPTJConfig", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, **TOK),
        CLM,
        causal_inputs,
        {"causal"},
        notes="4.57: GPTJPreTrainedModel sets _supports_param_buffer_assignment = False (the plugin "
        "hands it to stock there; an expected fallback in test_sweep); 5.x dropped the attribute",
    ),
    _arch(
        "opt",
        _cfg(
            "OPTConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "bloom",
        _cfg("BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **TOK),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "falcon",
        _cfg(
            "FalconConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "stablelm",
        _cfg("StableLmConfig", **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal"},
    ),
    _arch("starcoder2", _cfg("Starcoder2Config", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch("olmo", _cfg("OlmoConfig", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch("olmo2", _cfg("Olmo2Config", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch(
        "cohere",
        _cfg("CohereConfig", tie_word_embeddings=True, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch("granite", _cfg("GraniteConfig", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch(
        "mixtral",
        _cfg("MixtralConfig", num_local_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="5.x fuses experts.{i}.w1/w3 -> experts.gate_up_proj and w2 -> down_proj at load "
        "(conversion_mapping) and reverts the fusion on save, so the checkpoint keys are the "
        "4.x per-expert keys on both versions but the module layout differs",
    ),
    _arch(
        "qwen2_moe",
        _cfg(
            "Qwen2MoeConfig",
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="5.x fuses per-expert gate/up/down into stacked 3-D params at load",
    ),
    _arch(
        "qwen3_moe",
        _cfg(
            "Qwen3MoeConfig",
            head_dim=8,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="5.x fuses experts at load, like mixtral",
    ),
    _arch(
        "olmoe",
        _cfg("OlmoeConfig", num_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="5.x fuses experts at load",
    ),
    _arch(
        "gpt_bigcode",
        _cfg("GPTBigCodeConfig", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, **TOK),
        CLM,
        causal_inputs,
        {"causal", "tied"},
        notes="multi-query attention (fused c_attn of uneven width)",
    ),
    _arch(
        "codegen",
        _cfg(
            "CodeGenConfig",
            vocab_size=VOCAB,
            n_positions=64,
            n_ctx=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal"},
    ),
    _arch(
        "gpt_neo",
        _cfg(
            "GPTNeoConfig",
            vocab_size=VOCAB,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=16,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "mpt",
        _cfg("MptConfig", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, **TOK),
        CLM,
        causal_inputs,
        {"causal", "tied"},
    ),
    _arch(
        "persimmon",
        _cfg(
            "PersimmonConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal"},
    ),
    _arch("nemotron", _cfg("NemotronConfig", head_dim=8, **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch("helium", _cfg("HeliumConfig", head_dim=8, **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch(
        "rwkv",
        _cfg(
            "RwkvConfig",
            vocab_size=VOCAB,
            context_length=64,
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=64,
            rescale_every=0,
            **TOK,
        ),
        CLM,
        causal_inputs,
        {"causal", "keep_fp32"},
        notes="_keep_in_fp32_modules = [time_decay, time_first]",
    ),
    # Newer decoder families: multi-head latent attention, attention sinks, state-space
    # and hybrid layers, more expert layouts.
    _arch(
        "deepseek_v3",
        _cfg(
            "DeepseekV3Config",
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **{**LLAMA_LIKE, "num_key_value_heads": 4},
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="multi-head latent attention (low-rank q/kv projections); a dense first layer, "
        "then routed + shared experts (fused at load on 5.x); e_score_correction_bias buffer",
    ),
    _arch(
        "gpt_oss",
        _cfg(
            "GptOssConfig",
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            **{**LLAMA_LIKE, "intermediate_size": 32},
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="attention sinks (a per-head parameter); experts stored already fused as 3-D "
        "gate_up_proj/down_proj with biases",
    ),
    _arch(
        "glm4_moe",
        _cfg(
            "Glm4MoeConfig",
            head_dim=8,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
    ),
    _arch(
        "ernie4_5_moe",
        _cfg("Ernie4_5_MoeConfig", moe_num_experts=4, moe_k=2, moe_intermediate_size=16, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "moe"},
    ),
    _arch(
        "granitemoe",
        _cfg("GraniteMoeConfig", num_local_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="experts stored as one 3-D input_linear/output_linear per layer",
    ),
    _arch(
        "qwen3_next",
        _cfg(
            "Qwen3NextConfig",
            **QWEN3_NEXT_LIKE,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="hybrid: gated delta-net linear attention layers beside full attention",
    ),
    _arch(
        "mamba",
        _cfg("MambaConfig", vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
             conv_kernel=4, **TOK),
        CLM,
        causal_inputs,
        {"causal", "tied"},
        notes="state-space layers: A_log and D parameters, depthwise conv1d",
    ),
    _arch(
        "mamba2",
        _cfg("Mamba2Config", vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
             conv_kernel=4, num_heads=8, head_dim=8, n_groups=1, chunk_size=8, **TOK),
        CLM,
        causal_inputs,
        {"causal"},
    ),
    _arch(
        "jamba",
        _cfg(
            "JambaConfig",
            num_experts=4,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
            **LLAMA_LIKE,
        ),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="hybrid: mamba and attention layers, experts every other layer",
    ),
    _arch("smollm3", _cfg("SmolLM3Config", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    _arch("exaone4", _cfg("Exaone4Config", **LLAMA_LIKE), CLM, causal_inputs, {"causal"}),
    # 5.24's checkpoint conversions: save_pretrained writes the original checkpoint layout and
    # from_pretrained renames, splits or regroups it while loading (the config classes exist
    # from 5.24 on only, so older lines skip these entries).
    _arch(
        "exaone",
        _cfg("ExaoneConfig", **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal"},
        notes="a LlamaForCausalLM whose files keep EXAONE's names (transformer.h.N.attn.attention...), "
        "renamed at load",
    ),
    _arch(
        "dory",
        _cfg("DoryConfig", head_dim=8, sliding_window=16, n_input_layers=1, n_output_layers=1, n_recurrent_loops=2,
             **{**LLAMA_LIKE, "num_hidden_layers": 3}),
        CLM,
        causal_inputs,
        {"causal"},
        notes="recurrent middle layers; files under backbone. with a rename that computes each target "
        "layer (LayerPairCollapse)",
    ),
    _arch(
        "lara_mini",
        _cfg(
            "LaraMiniConfig",
            **QWEN3_NEXT_LIKE,
            sliding_window=16,
            **{**LLAMA_LIKE, "num_hidden_layers": 4},
        ),
        CLM,
        causal_inputs,
        {"causal", "moe", "tied"},
        notes="hybrid gated delta-net; the files' fused linear_attn.in_proj is split into four at load",
    ),
    _arch(
        "sarvam_moe",
        _cfg("SarvamMoEConfig", head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=1, **LLAMA_LIKE),
        CLM,
        causal_inputs,
        {"causal", "moe"},
        notes="a Glm4MoeForCausalLM from files with fused query_key_value (split at load) and "
        "per-expert weights (fused at load)",
    ),
    # ---------------------------------------------------------------- seq2seq
    _arch(
        "t5",
        _cfg("T5Config", **T5_LIKE),
        S2S,
        seq2seq_inputs,
        {"seq2seq", "tied", "keep_fp32"},
        notes="_keep_in_fp32_modules = [wo], honoured for fp16 loads only (bf16 loads cast wo too, "
        "on both versions); shared/encoder/decoder embeddings + lm_head tied",
    ),
    _arch(
        "mt5",
        _cfg("MT5Config", tie_word_embeddings=False, **T5_LIKE),
        S2S,
        seq2seq_inputs,
        {"seq2seq", "keep_fp32"},
        notes="tie_word_embeddings=False set explicitly, as in real mt5 configs: MT5Config defaults "
        "to False on 4.57 but to True on 5.x; keep wo in fp32",
    ),
    _arch("umt5", _cfg("UMT5Config", **T5_LIKE), S2S, seq2seq_inputs, {"seq2seq", "keep_fp32"}),
    _arch("bart", _cfg("BartConfig", **BART_LIKE), S2S, seq2seq_inputs, {"seq2seq", "tied"}),
    _arch("mbart", _cfg("MBartConfig", **BART_LIKE), S2S, seq2seq_inputs, {"seq2seq", "tied"}),
    _arch("pegasus", _cfg("PegasusConfig", **BART_LIKE), S2S, seq2seq_inputs, {"seq2seq", "tied"}),
    _arch(
        "marian",
        _cfg("MarianConfig", **{**BART_LIKE, "decoder_start_token_id": 0}),
        S2S,
        seq2seq_inputs,
        {"seq2seq", "tied"},
        notes="sinusoidal position embeddings are saved weights",
    ),
    _arch("m2m_100", _cfg("M2M100Config", **BART_LIKE), S2S, seq2seq_inputs, {"seq2seq", "tied"}),
    _arch("blenderbot", _cfg("BlenderbotConfig", **BART_LIKE), S2S, seq2seq_inputs, {"seq2seq", "tied"}),
    _arch(
        "whisper",
        _cfg(
            "WhisperConfig",
            vocab_size=VOCAB,
            num_mel_bins=16,
            encoder_layers=1,
            decoder_layers=1,
            d_model=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=32,
            decoder_start_token_id=3,
            suppress_tokens=None,
            begin_suppress_tokens=None,
            **TOK,
        ),
        "AutoModelForSpeechSeq2Seq",
        whisper_inputs,
        {"seq2seq", "audio", "tied"},
        notes="encoder sinusoidal embed_positions; proj_out tied to decoder embed_tokens",
    ),
    _arch(
        "whisper_audio_cls",
        _cfg(
            "WhisperConfig",
            vocab_size=VOCAB,
            num_mel_bins=16,
            encoder_layers=1,
            decoder_layers=1,
            d_model=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=32,
            classifier_proj_size=16,
            num_labels=3,
            suppress_tokens=None,
            begin_suppress_tokens=None,
            **TOK,
        ),
        "AutoModelForAudioClassification",
        whisper_cls_inputs,
        {"audio", "encoder"},
    ),
    # ---------------------------------------------------------------- masked LM / encoders
    _arch("bert", _cfg("BertConfig", **BERT_LIKE, pad_token_id=0), MLM, encoder_inputs, {"encoder", "tied"}),
    _arch("roberta", _cfg("RobertaConfig", **BERT_LIKE, pad_token_id=1), MLM, encoder_inputs, {"encoder", "tied"}),
    _arch(
        "xlm_roberta",
        _cfg("XLMRobertaConfig", **BERT_LIKE, pad_token_id=1),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
    ),
    _arch(
        "camembert",
        _cfg("CamembertConfig", **BERT_LIKE, pad_token_id=1),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
    ),
    _arch(
        "distilbert",
        _cfg("DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
    ),
    _arch(
        "albert",
        _cfg(
            "AlbertConfig",
            vocab_size=VOCAB,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            **TOK,
        ),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
        notes="shared layer weights across depth (one layer group)",
    ),
    _arch(
        "electra",
        _cfg("ElectraConfig", embedding_size=16, **BERT_LIKE),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
    ),
    _arch(
        "deberta_v2",
        _cfg("DebertaV2Config", **BERT_LIKE, relative_attention=True, position_buckets=16, max_relative_positions=32),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
        notes="5.x: DebertaV2ForMaskedLM head is lm_predictions.lm_head (legacy cls.predictions keys renamed)",
    ),
    _arch(
        "bert_seqcls",
        _cfg("BertConfig", **BERT_LIKE, pad_token_id=0, num_labels=3),
        "AutoModelForSequenceClassification",
        encoder_inputs,
        {"encoder"},
    ),
    _arch("bert_base", _cfg("BertConfig", **BERT_LIKE, pad_token_id=0), "AutoModel", encoder_inputs, {"encoder"}),
    _arch(
        "modernbert",
        _cfg(
            "ModernBertConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            cls_token_id=1,
            sep_token_id=2,
            **TOK,
        ),
        MLM,
        encoder_inputs,
        {"encoder", "tied"},
    ),
    # ---------------------------------------------------------------- vision
    _arch(
        "vit",
        _cfg("ViTConfig", **VIT_LIKE),
        IMG,
        image_inputs,
        {"vision"},
        notes="5.x renames the modules (vit.encoder.layer.N.attention.attention.key -> "
        "vit.layers.N.attention.k_proj, output.dense -> mlp.fc2, ...); files keep the 4.x names",
    ),
    _arch(
        "deit",
        _cfg("DeiTConfig", architectures=["DeiTForImageClassification"], **VIT_LIKE),
        IMG,
        image_inputs,
        {"vision"},
        notes="5.x module renames as for vit; deit maps to two classes (with/without teacher) in the image-classification "
        "auto mapping; config.architectures picks one, Auto*.from_config crashes without it",
    ),
    _arch(
        "beit",
        _cfg("BeitConfig", vocab_size=64, **VIT_LIKE),
        IMG,
        image_inputs,
        {"vision"},
        notes="5.x module renames as for vit",
    ),
    _arch(
        "dinov2",
        _cfg("Dinov2Config", **VIT_LIKE),
        "AutoModel",
        image_inputs,
        {"vision"},
        notes="5.x renames attention.attention.query -> attention.q_proj etc. on load",
    ),
    _arch(
        "convnext",
        _cfg(
            "ConvNextConfig",
            num_channels=3,
            patch_size=4,
            num_stages=2,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            image_size=32,
            num_labels=3,
        ),
        IMG,
        image_inputs,
        {"vision"},
    ),
    _arch(
        "swin",
        _cfg(
            "SwinConfig",
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=3,
        ),
        IMG,
        image_inputs,
        {"vision"},
        notes="relative_position_index: a persistent int64 buffer (saved) on 4.57, non-persistent "
        "on 5.x; 5.x also renames attention/mlp modules on load",
    ),
    _arch(
        "resnet",
        _cfg(
            "ResNetConfig",
            num_channels=3,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type="basic",
            num_labels=3,
        ),
        IMG,
        image_inputs,
        {"vision", "int_buffer"},
        notes="BatchNorm running stats + int64 num_batches_tracked buffers",
    ),
    _arch(
        "clip",
        _cfg(
            "CLIPConfig",
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=16,
                **TOK,
            ),
            vision_config=dict(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=16,
        ),
        "AutoModel",
        clip_inputs,
        {"vision", "encoder"},
        notes="composite config (text_config + vision_config); logit_scale scalar param",
    ),
    _arch(
        "siglip",
        _cfg(
            "SiglipConfig",
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=16,
                **TOK,
            ),
            vision_config=VISION_TOWER,
        ),
        "AutoModel",
        clip_inputs,
        {"vision", "encoder"},
        notes="composite config; logit_scale and logit_bias scalar params",
    ),
    # Image-text models: a vision tower, a projector and a language model under one
    # composite config; 5.x nests the language model and renames legacy keys on load.
    _arch(
        "llava",
        _cfg(
            "LlavaConfig",
            text_config=dict(model_type="llama", **LLAMA_LIKE),
            vision_config=dict(model_type="clip_vision_model", **VISION_TOWER),
            image_token_index=100,
        ),
        IMAGE_TEXT,
        text_only_inputs,
        {"vision", "causal"},
    ),
    _arch(
        "gemma3",
        _cfg(
            "Gemma3Config",
            text_config=dict(model_type="gemma3_text", head_dim=8, sliding_window=16, **LLAMA_LIKE),
            vision_config=dict(model_type="siglip_vision_model", **VISION_TOWER),
            mm_tokens_per_image=4,
            image_token_index=100,
            boi_token_index=101,
            eoi_token_index=102,
        ),
        IMAGE_TEXT,
        text_only_inputs,
        {"vision", "causal", "tied"},
    ),
    _arch(
        "qwen2_vl",
        _cfg(
            "Qwen2VLConfig",
            text_config=dict(
                model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **LLAMA_LIKE
            ),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=100,
            video_token_id=101,
            vision_start_token_id=102,
        ),
        IMAGE_TEXT,
        text_only_inputs,
        {"vision", "causal"},
        notes="its config takes text_config from 4.52 on",
        min_version="4.52",
    ),
    # ---------------------------------------------------------------- audio
    _arch(
        "wav2vec2",
        _cfg("Wav2Vec2Config", **W2V_LIKE),
        "AutoModelForCTC",
        audio_inputs,
        {"audio", "weight_norm"},
        notes="pos_conv weight_norm: parametrizations.weight.original0/1 in the module, "
        "weight_g/weight_v accepted on load (renamed)",
    ),
    _arch(
        "hubert",
        _cfg("HubertConfig", **W2V_LIKE),
        "AutoModelForAudioClassification",
        audio_inputs,
        {"audio", "weight_norm"},
    ),
    _arch("wavlm", _cfg("WavLMConfig", **W2V_LIKE, num_buckets=16, max_bucket_distance=32), "AutoModel", audio_inputs, {"audio", "weight_norm"}),
    _arch(
        "data2vec_audio",
        _cfg("Data2VecAudioConfig", **W2V_LIKE),
        "AutoModelForCTC",
        audio_inputs,
        {"audio"},
    ),
]

_BY_NAME = {a.name: a for a in ARCHITECTURES}
assert len(_BY_NAME) == len(ARCHITECTURES), "duplicate architecture names"


def catalogue() -> list[Arch]:
    """Entries usable with the installed transformers version."""
    return [a for a in ARCHITECTURES if a.supported()]


def get(name: str) -> Arch:
    return _BY_NAME[name]


def representative() -> list[Arch]:
    """The REPRESENTATIVE entries buildable on the installed transformers."""
    return [get(name) for name in REPRESENTATIVE if get(name).supported()]


# Representative subset that gets the full dtype / layout matrix in test_sweep.py.
# Chosen to cover every special feature once or more: plain llama, tied + Conv1D
# (gpt2), tied + keep_fp32 + seq2seq (t5), MoE weight fusion in 5.x (mixtral,
# qwen2_moe), tied embeddings in an encoder (bert), audio seq2seq (whisper),
# weight-norm parametrisation (wav2vec2), BatchNorm int buffers (resnet), vision
# transformer (vit), gemma (tied, scaled embeddings), bart, untied seq2seq with
# keep_fp32 (mt5), keep_fp32 in a causal LM (rwkv), composite config (clip), multi-head
# latent attention with routed + shared experts (deepseek_v3), an image-text model whose
# language model 5.x nests and renames (gemma3).
REPRESENTATIVE = [
    "llama",
    "gpt2",
    "gemma",
    "t5",
    "mixtral",
    "qwen2_moe",
    "bart",
    "whisper",
    "bert",
    "vit",
    "resnet",
    "wav2vec2",
    "mt5",
    "rwkv",
    "clip",
    "deepseek_v3",
    "gemma3",
]
