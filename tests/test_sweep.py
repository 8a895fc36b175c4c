"""Architecture sweep: stock vs fast ``from_pretrained`` must give the same model.

Every case loads one checkpoint twice (stock under ``fasthug_patch.disabled()``,
fast under ``fasthug_patch.enabled()``), asserts the two models are identical bit for
bit (:func:`parity.assert_same_model`), and asserts the fast load really took the
fast path -- unless the case is in ``EXPECTED_FALLBACKS`` (each with its reason).

Split, to keep the file at a couple of minutes per transformers version on 2 cores:

* every catalogue architecture: default load (no dtype kwarg: fp32 on 4.57, "auto"
  on 5.x) and ``dtype=bfloat16``, from an fp32 checkpoint;
* ``REPRESENTATIVE`` architectures: the full matrix -- fp32 and bf16 checkpoints
  x default / bf16 / fp16 / fp32 / "auto" loads, ``device_map="cpu"``, sharded
  safetensors with an index, ``variant="fp16"``, ``subfolder=``, ``.bin``, a missing
  key, an extra key, and a save_pretrained round trip of the loaded models;
* special cases: legacy key names (LayerNorm gamma/beta, weight_g/weight_v),
  base-model <-> head-model prefix handling, ``ignore_mismatched_sizes`` with a
  changed vocab / label count, 5.x checkpoints saved in the in-memory format
  (``save_original_format=False``: fused experts, renamed modules), a missing MoE
  expert, ``state_dict=`` given (an expected fallback);
* loads stock refuses (size mismatch without ``ignore_mismatched_sizes``; on 5.x an
  MoE checkpoint missing one expert): the fast load must raise the same error.

Checkpoints are written once per session (``checkpoints`` fixture) into a tmp dir.

The last test asserts that the default load took the fast path for >= 90% of the
architectures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

import fasthug_patch  # noqa: F401  (importing it patches transformers)
from tests.architectures import IS_V5, LEGACY_STATE_DICT_LOAD, TRANSFORMERS_VERSION, Arch, catalogue, get, representative
from tests.parity import (
    DEFAULT,
    adopt_values_stock_leaves_undefined,
    LoadedPair,
    assert_same_failure,
    assert_same_model,
    assert_same_pair,
    build_checkpoint,
    checkpoint_files,
    dtype_kwargs,
    dtype_name,
    edit_safetensors,
    load_model,
    load_pair,
    load_pair_expecting_failure,
    report_path,
    report_reason,
    safetensors_keys,
    shard_count,
)

pytestmark = [
    # benign, from building/loading the tiny configs themselves
    pytest.mark.filterwarnings("ignore:Moving the following attributes in the config to the generation config"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

ARCHS = catalogue()
REPR = representative()
MOE = [a for a in ARCHS if "moe" in a.tags]

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
_BEFORE_4_46 = TRANSFORMERS_VERSION.release[:2] < (4, 46)


# --------------------------------------------------------------------------- expected fallbacks

# Cases allowed to take the stock path ("fallback") instead of the fast one. Keys are
# "<scenario>" (any architecture), "<scenario>:<arch>" or "*:<arch>" (any scenario of
# that architecture; <arch> is the checkpoint's entry name). A fallback not listed here
# fails the case; a listed case that goes fast passes too. Keep the reasons honest.
EXPECTED_FALLBACKS: dict[str, str] = {
    "state_dict_given": "weights are passed in memory (from_pretrained(state_dict=...)): there is "
    "no file to map or read in parallel, so the fast path has nothing to speed up",
}
# No exception for classes with `_supports_param_buffer_assignment = False` (GPT-J,
# GPT2Model): before 4.51 the plugin hands stock the tensors and stock decides whether
# to assign or copy them; 4.51+ assigns to every class alike.
if LEGACY_STATE_DICT_LOAD:  # v4_legacy.py answers these shards
    EXPECTED_FALLBACKS.update({
        "bin": "before 4.51 stock already loads .bin shards with torch.load(mmap=True); the engine "
        "answers safetensors shards only",
        "bin-bf16": "as 'bin'",
    })


def _fallback_allowed(scenario: str, arch: str) -> str | None:
    return (
        EXPECTED_FALLBACKS.get(f"{scenario}:{arch}")
        or EXPECTED_FALLBACKS.get(f"*:{arch}")
        or EXPECTED_FALLBACKS.get(scenario)
    )


# path taken by the default load of each architecture, for the coverage check
DEFAULT_LOAD_PATHS: dict[str, str] = {}
DEFAULT_LOAD_REASONS: dict[str, str] = {}
CASE_PATHS: dict[str, str] = {}  # "<arch>/<scenario>" -> path, every case that loaded
COVERAGE_THRESHOLD = 0.90


def check_path(report, scenario: str, arch: str) -> None:
    path = report_path(report)
    if path == "fast":
        return
    allowed = _fallback_allowed(scenario, arch)
    if allowed and path == "fallback":
        assert report_reason(report), "a fallback report must say why"
        return
    pytest.fail(
        f"{arch}/{scenario}: expected the fast path, got {path!r} "
        f"(reason: {report_reason(report)!r}). If this is intended, add "
        f"'{scenario}:{arch}' with a reason to EXPECTED_FALLBACKS."
    )


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Scenario:
    name: str
    layout: str = "plain"  # see CheckpointCache._build
    ckpt_dtype: torch.dtype = FP32
    load_dtype: Any = DEFAULT
    load_kwargs: tuple = ()  # extra from_pretrained kwargs as (key, value) pairs
    inference_mode: bool = False  # both loads inside torch.inference_mode()

    def kwargs(self) -> dict:
        return {**dtype_kwargs(self.load_dtype), **dict(self.load_kwargs)}


class CheckpointCache:
    """Builds each (arch, layout, dtype) checkpoint once per session, lazily."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple, tuple[Path, dict, dict]] = {}

    def get(self, arch: Arch, layout: str = "plain", dtype: torch.dtype = FP32) -> tuple[Path, dict, dict]:
        """(path for from_pretrained, extra from_pretrained kwargs, facts about the edit)."""
        key = (arch.name, layout, dtype)
        if key not in self._built:
            directory = self.root / f"{arch.name}-{layout}-{dtype_name(dtype)}"
            self._built[key] = self._build(arch, layout, dtype, directory)
        return self._built[key]

    def _copy_plain(self, arch, dtype, directory) -> Path:
        src, _, _ = self.get(arch, "plain", dtype)
        shutil.copytree(src, directory)
        return directory

    def _build(self, arch, layout, dtype, directory) -> tuple[Path, dict, dict]:
        if layout == "plain":
            return build_checkpoint(arch, directory, dtype=dtype), {}, {}
        if layout == "sharded":
            plain, _, _ = self.get(arch, "plain", dtype)
            size = sum(p.stat().st_size for p in checkpoint_files(plain))
            build_checkpoint(arch, directory, dtype=dtype, max_shard_size=max(size // 3, 1))
            assert shard_count(directory) >= 2, f"{arch.name}: expected >= 2 shards"
            assert (directory / "model.safetensors.index.json").is_file()
            return directory, {}, {}
        if layout == "variant":
            build_checkpoint(arch, directory, dtype=dtype, variant="fp16")
            assert (directory / "model.fp16.safetensors").is_file(), sorted(p.name for p in directory.iterdir())
            return directory, {"variant": "fp16"}, {}
        if layout == "subfolder":
            build_checkpoint(arch, directory / "weights", dtype=dtype)
            return directory, {"subfolder": "weights"}, {}
        if layout == "bin":
            build_checkpoint(arch, directory, dtype=dtype, safe_serialization=False)
            assert (directory / "pytorch_model.bin").is_file()
            assert not list(directory.glob("*.safetensors"))
            return directory, {}, {}
        if layout == "missing":
            self._copy_plain(arch, dtype, directory)
            path = directory / "model.safetensors"
            victim = pick_missing_key(load_file(str(path)))
            edit_safetensors(path, drop=[victim])
            return directory, {}, {"dropped": victim}
        if layout == "missing_expert":  # one expert's tensor of one layer
            self._copy_plain(arch, dtype, directory)
            path = directory / "model.safetensors"
            victim = next(k for k in sorted(safetensors_keys(path)) if ".experts.1." in k)
            edit_safetensors(path, drop=[victim])
            return directory, {}, {"dropped": victim}
        if layout == "extra":
            self._copy_plain(arch, dtype, directory)
            path = directory / "model.safetensors"
            extra = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(dtype)
            edit_safetensors(path, add={"parity_extra.weight": extra})
            return directory, {}, {"added": "parity_extra.weight"}
        if layout == "legacy_keys":
            self._copy_plain(arch, dtype, directory)
            path = directory / "model.safetensors"
            state = load_file(str(path))
            renamed = {legacy_name(k): v for k, v in state.items()}
            assert renamed.keys() != state.keys(), f"{arch.name}: no legacy-renamable keys"
            edit_safetensors(path, drop=list(state), add=renamed)
            return directory, {}, {"renamed": sorted(set(renamed) - set(state))}
        if layout == "native":  # transformers 5.x: save the in-memory names (no reverse conversion)
            build_checkpoint(arch, directory, dtype=dtype, save_kwargs={"save_original_format": False})
            return directory, {}, {}
        raise ValueError(layout)


def pick_missing_key(state: dict[str, torch.Tensor]) -> str:
    """A plain 2-D layer weight: not an embedding/head (ties) and not an MoE expert
    (5.x fuses experts, one missing expert is a different case)."""
    avoid = ("embed", "shared", "wte", "wpe", "word_embeddings", "lm_head", "experts", "position")
    candidates = [k for k in sorted(state) if state[k].ndim == 2 and not any(a in k for a in avoid)]
    return candidates[len(candidates) // 2] if candidates else sorted(state)[len(state) // 2]


def legacy_name(key: str) -> str:
    """Pre-2020 / TF-era names that both transformers lines still rename on load."""
    key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    key = key.replace("parametrizations.weight.original0", "weight_g")
    key = key.replace("parametrizations.weight.original1", "weight_v")
    return key


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> CheckpointCache:
    return CheckpointCache(tmp_path_factory.mktemp("sweep_ckpts"))


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    transformers.utils.logging.disable_progress_bar()
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(previous)
    transformers.utils.logging.enable_progress_bar()


# --------------------------------------------------------------------------- running one case


def run_case(checkpoints: CheckpointCache, arch: Arch, scenario: Scenario, load_class=None) -> LoadedPair:
    path, extra_kwargs, facts = checkpoints.get(arch, scenario.layout, scenario.ckpt_dtype)
    kwargs = {**scenario.kwargs(), **extra_kwargs}
    with torch.inference_mode() if scenario.inference_mode else contextlib.nullcontext():
        pair = load_pair(load_class or arch, path, **kwargs)
    if scenario.name == "default" and load_class is None:
        DEFAULT_LOAD_PATHS[arch.name] = report_path(pair.report)  # before any assertion
        DEFAULT_LOAD_REASONS[arch.name] = report_reason(pair.report)
    CASE_PATHS[f"{arch.name}/{scenario.name}"] = report_path(pair.report)
    context = f"{arch.name}/{scenario.name} ({type(pair.stock).__name__}, kwargs={kwargs})"
    check_scenario_took_effect(pair, scenario, facts, context)
    adopt_values_stock_leaves_undefined(pair, load_class or arch, path, **kwargs)
    assert_same_pair(pair, arch.make_inputs(pair.stock.config), context=context)
    check_path(pair.report, scenario.name, arch.name)
    return pair


def check_scenario_took_effect(pair: LoadedPair, scenario: Scenario, facts: dict, context: str) -> None:
    """Harness sanity: the stock load really exercised what the scenario is about."""
    stock, info = pair.stock, pair.stock_info
    if isinstance(scenario.load_dtype, torch.dtype):
        dtypes = {p.dtype for p in stock.parameters() if p.is_floating_point()}
        assert scenario.load_dtype in dtypes, f"{context}: stock load has dtypes {dtypes}"
    if "dropped" in facts:
        assert info["missing_keys"], f"{context}: dropping {facts['dropped']} left no missing key"
    if "added" in facts:
        assert info["unexpected_keys"], f"{context}: the added key was not reported as unexpected"
    if "renamed" in facts and not (_BEFORE_4_46 and all("parametrizations" in k for k in info["missing_keys"])):
        # (stock < 4.46 does not rename weight_g/weight_v: they stay missing and are
        # initialised, on both sides; parity is still checked)
        assert not info["missing_keys"], f"{context}: legacy names were not renamed: {info['missing_keys']}"
    if dict(scenario.load_kwargs).get("ignore_mismatched_sizes"):
        assert info["mismatched_keys"], f"{context}: no mismatched key reported"
    # (no device_map check: 5.x sets hf_device_map only for multi-device maps, and the
    # equality of hf_device_map is part of assert_same_model anyway)


# --------------------------------------------------------------------------- 1. every architecture

BASIC = [
    Scenario("default"),
    Scenario("bf16", load_dtype=BF16),
]


@pytest.mark.parametrize(
    "arch,scenario",
    [pytest.param(a, s, id=f"{a.name}-{s.name}") for a in ARCHS for s in BASIC],
)
def test_every_architecture(checkpoints, arch, scenario):
    run_case(checkpoints, arch, scenario)


# --------------------------------------------------------------------------- 2. representative matrix

MATRIX = [
    # fp32 checkpoint (default and bf16 loads are covered for every architecture above)
    Scenario("fp32ckpt-fp16", load_dtype=FP16),
    Scenario("fp32ckpt-fp32", load_dtype=FP32),
    Scenario("fp32ckpt-auto", load_dtype="auto"),
    # bf16 checkpoint
    Scenario("bf16ckpt-default", ckpt_dtype=BF16),
    Scenario("bf16ckpt-bf16", ckpt_dtype=BF16, load_dtype=BF16),
    Scenario("bf16ckpt-fp16", ckpt_dtype=BF16, load_dtype=FP16),
    Scenario("bf16ckpt-fp32", ckpt_dtype=BF16, load_dtype=FP32),
    Scenario("bf16ckpt-auto", ckpt_dtype=BF16, load_dtype="auto"),
    # device_map
    Scenario("device_map_cpu", load_kwargs=(("device_map", "cpu"),)),
    Scenario("bf16ckpt-device_map_cpu-auto", ckpt_dtype=BF16, load_dtype="auto", load_kwargs=(("device_map", "cpu"),)),
    # layouts
    Scenario("sharded", layout="sharded"),
    Scenario("sharded-bf16ckpt-fp32", layout="sharded", ckpt_dtype=BF16, load_dtype=FP32),
    Scenario("variant_fp16", layout="variant", ckpt_dtype=FP16),
    Scenario("subfolder-bf16", layout="subfolder", load_dtype=BF16),
    Scenario("bin", layout="bin"),
    Scenario("bin-bf16", layout="bin", load_dtype=BF16),
    Scenario("missing_key", layout="missing"),
    Scenario("extra_key", layout="extra"),
]


@pytest.mark.parametrize(
    "arch,scenario",
    [pytest.param(a, s, id=f"{a.name}-{s.name}") for a in REPR for s in MATRIX],
)
def test_representative_matrix(checkpoints, arch, scenario):
    run_case(checkpoints, arch, scenario)


@pytest.mark.parametrize("arch", REPR, ids=lambda a: a.name)
def test_resave_roundtrip(checkpoints, arch, tmp_path):
    """save_pretrained of the fast-loaded model writes the same files as of the stock one
    (catches storage sharing / views that change what gets serialised)."""
    path, kw, _ = checkpoints.get(arch, "plain", FP32)
    pair = load_pair(arch, path, **kw)
    check_path(pair.report, "default", arch.name)
    pair.stock.save_pretrained(tmp_path / "stock")
    pair.fast.save_pretrained(tmp_path / "fast")
    names_s = sorted(p.name for p in (tmp_path / "stock").iterdir())
    names_f = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert names_s == names_f
    for name in names_s:
        assert (tmp_path / "stock" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes(), (
            f"{arch.name}: re-saved {name} differs between stock- and fast-loaded models"
        )


# --------------------------------------------------------------------------- 3. special cases


@dataclass(frozen=True)
class Special:
    name: str
    arch: str  # checkpoint built from this entry
    scenario: Scenario
    load_class: str | None = None  # Auto class used to load, default: the entry's
    note: str = ""


# a llama *base-model* checkpoint (no "model." prefix, no lm_head)
_LLAMA_BASE = Arch("llama_base", get("llama").make_config, "AutoModel", get("llama").make_inputs, frozenset({"causal"}))

SPECIALS = [
    Special("legacy_layernorm_gamma_beta", "bert", Scenario("legacy_keys", layout="legacy_keys"),
            note="LayerNorm.gamma/beta -> weight/bias rename on load"),
    Special("legacy_weight_norm_g_v", "wav2vec2", Scenario("legacy_keys", layout="legacy_keys"),
            note="weight_g/weight_v -> parametrizations.weight.original0/1 rename on load"),
    Special("base_ckpt_into_mlm_head", "bert_base", Scenario("base_to_head"), "AutoModelForMaskedLM",
            note="checkpoint without the 'bert.' prefix; head weights missing, decoder tied"),
    Special("base_ckpt_into_seqcls_head", "bert_base", Scenario("base_to_head"), "AutoModelForSequenceClassification",
            note="classifier missing -> seeded init on both sides"),
    Special("mlm_ckpt_into_base", "bert", Scenario("head_to_base"), "AutoModel",
            note="'bert.' prefix stripped, cls.* unexpected"),
    Special("causal_ckpt_into_base", "llama", Scenario("head_to_base"), "AutoModel",
            note="'model.' prefix stripped, lm_head unexpected"),
    Special("base_ckpt_into_causal_head", "llama_base", Scenario("base_to_head"), "AutoModelForCausalLM",
            note="'model.' prefix added, lm_head missing -> seeded init on both sides"),
    Special("gpt2_ckpt_into_base", "gpt2", Scenario("head_to_base"), "AutoModel"),
    Special("t5_ckpt_into_t5model", "t5", Scenario("head_to_base"), "AutoModel",
            note="T5Model has no lm_head"),
    Special("t5_ckpt_into_t5model_fp16", "t5", Scenario("head_to_base-fp16", load_dtype=FP16), "AutoModel",
            note="keep_in_fp32 'wo' under an fp16 load (4.57 applies _keep_in_fp32_modules to fp16 only)"),
    Special("mismatched_vocab_ignored", "llama",
            Scenario("mismatched", load_kwargs=(("vocab_size", 130), ("ignore_mismatched_sizes", True))),
            note="embed_tokens/lm_head reported in mismatched_keys and re-initialised (seeded)"),
    Special("mismatched_vocab_ignored_tied_conv1d", "gpt2",
            Scenario("mismatched", load_kwargs=(("vocab_size", 130), ("ignore_mismatched_sizes", True)))),
    Special("mismatched_num_labels_text", "bert_seqcls",
            Scenario("mismatched", load_kwargs=(("num_labels", 5), ("ignore_mismatched_sizes", True))),
            note="the usual fine-tuning load: classifier re-initialised"),
    Special("mismatched_num_labels_image", "vit",
            Scenario("mismatched", load_kwargs=(("num_labels", 5), ("ignore_mismatched_sizes", True)))),
    # loading options users pass that change what stock builds around the weights
    Special("config_override_fewer_layers", "llama", Scenario("config_override", load_kwargs=(("num_hidden_layers", 1),)),
            note="a config kwarg: the second layer's tensors become unexpected keys"),
    Special("float64", "llama", Scenario("float64", load_dtype=torch.float64)),
    Special("dtype_as_string", "gemma", Scenario("dtype_string", load_dtype="bfloat16")),
    Special("eager_attention", "llama", Scenario("eager", load_kwargs=(("attn_implementation", "eager"),))),
    Special("auto_map_with_max_memory", "mixtral",
            Scenario("max_memory", load_kwargs=(("device_map", "auto"), ("max_memory", {"cpu": "1GB"})))),
    # serving code loads inside torch.inference_mode(): which weights are inference tensors
    # follows the thread stock makes them on (tests/test_thread_modes.py)
    Special("inference_mode", "llama", Scenario("inference_mode", inference_mode=True)),
    Special("inference_mode_cast", "llama", Scenario("inference_mode-bf16", load_dtype=BF16, inference_mode=True)),
    Special("inference_mode_moe", "mixtral", Scenario("inference_mode-moe", inference_mode=True)),
]
if not IS_V5:
    # on 4.57 experts are plain modules, a missing expert tensor is just a missing key
    # (5.x cannot fuse the incomplete group and refuses: see test_same_failure)
    SPECIALS.append(Special("moe_missing_expert", "mixtral", Scenario("missing_expert", layout="missing_expert")))
if IS_V5:
    # 5.x only: save_pretrained(save_original_format=False) writes the in-memory names
    # (fused experts, renamed modules) instead of reverting to the 4.x names
    SPECIALS += [
        Special(f"native_format_{a.name}", a.name, Scenario("native_format", layout="native"))
        for a in MOE + [get(n) for n in ("gpt_neox", "vit", "swin", "dinov2")]
    ]


def _special_arch(name: str) -> Arch:
    return _LLAMA_BASE if name == "llama_base" else get(name)


@pytest.mark.parametrize("case", SPECIALS, ids=lambda c: c.name)
def test_special_cases(checkpoints, case):
    run_case(checkpoints, _special_arch(case.arch), case.scenario, load_class=case.load_class)


@pytest.mark.skipif(TRANSFORMERS_VERSION.release[:2] < (4, 51), reason="from_pretrained(key_mapping=) arrived in 4.51")
def test_key_mapping(checkpoints):
    """key_mapping= renames checkpoint keys before stock matches them (4.57 stops at the
    first pattern that matches; 5.x applies each as a WeightRenaming in turn, so a swap of
    two names is not one there). Layer 0's k_proj renamed onto its v_proj: k_proj is missing
    (seeded init) and two sources meet at v_proj; whichever stock keeps, the fast path must
    keep."""
    arch = get("llama")
    path, _, _ = checkpoints.get(arch, "plain", FP32)
    pair = load_pair(arch, path, key_mapping={r"layers\.0\.self_attn\.k_proj": "layers.0.self_attn.v_proj"})
    assert "model.layers.0.self_attn.k_proj.weight" in pair.stock_info["missing_keys"], "the mapping did not apply"
    assert_same_pair(pair, arch.make_inputs(pair.stock.config), context="key_mapping")
    check_path(pair.report, "key_mapping", arch.name)


@pytest.mark.parametrize("arch_name", ["llama", "t5"])
def test_state_dict_given(checkpoints, arch_name):
    """from_pretrained(path, state_dict=...) -- an expected fallback (see EXPECTED_FALLBACKS)."""
    arch = get(arch_name)
    path, _, _ = checkpoints.get(arch, "plain", FP32)
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = arch.auto._model_mapping[type(config)]  # Auto classes refuse a None path

    def load():  # a fresh state dict each time: from_pretrained may consume it
        return load_model(model_class, None, config=config, state_dict=load_file(str(path / "model.safetensors")))

    with fasthug_patch.disabled():
        stock, _ = load()
    with fasthug_patch.enabled():
        before = fasthug_patch.last_report()
        fast, _ = load()
        report = fasthug_patch.last_report()
    assert_same_model(stock, fast, arch.make_inputs(stock.config), context=f"{arch_name}/state_dict_given")
    if report is before:
        report = None
    check_path(report, "state_dict_given", arch_name)


# loads stock refuses: the fast load must refuse the same way (type and message)
FAILURES = [
    ("vocab_mismatch_not_ignored", "llama", "plain", {"vocab_size": 130}),
]
if IS_V5:
    FAILURES.append(("moe_missing_expert", "mixtral", "missing_expert", {}))


@pytest.mark.parametrize("name,arch_name,layout,kwargs", FAILURES, ids=[f[0] for f in FAILURES])
def test_same_failure(checkpoints, name, arch_name, layout, kwargs):
    arch = get(arch_name)
    path, extra, _ = checkpoints.get(arch, layout, FP32)
    failed = load_pair_expecting_failure(arch, path, **kwargs, **extra)
    assert_same_failure(failed, context=f"{arch_name}/{name}")


# --------------------------------------------------------------------------- 4. coverage


@pytest.fixture(scope="module", autouse=True)
def _matrix_record():
    """With FASTHUG_MATRIX_RECORD=file (scripts/matrix.py sets it), write what this version
    did: every architecture's default-load path and reason, and the path of every case."""
    yield
    target = os.environ.get("FASTHUG_MATRIX_RECORD")
    if not target:
        return
    from tests.architectures import ARCHITECTURES

    record = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "architectures": {
            a.name: {"family": a.family, "path": DEFAULT_LOAD_PATHS[a.name], "reason": DEFAULT_LOAD_REASONS[a.name]}
            for a in ARCHS if a.name in DEFAULT_LOAD_PATHS
        },
        "not_buildable": sorted(a.name for a in ARCHITECTURES if not a.supported()),
        "cases": dict(sorted(CASE_PATHS.items())),
    }
    Path(target).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def test_zz_fast_path_coverage():
    """The default load went fast for >= 90% of the architectures (runs last)."""
    if len(DEFAULT_LOAD_PATHS) < len(ARCHS) // 2:
        pytest.skip(f"only {len(DEFAULT_LOAD_PATHS)} default loads ran (selection with -k?)")
    fast = sorted(n for n, p in DEFAULT_LOAD_PATHS.items() if p == "fast")
    ratio = len(fast) / len(DEFAULT_LOAD_PATHS)
    slow = {n: p for n, p in DEFAULT_LOAD_PATHS.items() if p != "fast"}
    assert ratio >= COVERAGE_THRESHOLD, f"fast path for {ratio:.0%} of architectures; not fast: {slow}"


def test_catalogue_size():
    assert len(ARCHS) >= 45, [a.name for a in ARCHS]
