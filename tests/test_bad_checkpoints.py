"""A corpus of broken checkpoints, each derived from a good tiny one.

For every one the patched load gives what stock gives: the same model bit for bit, or the
same exception (type and message), or a subclass of it whose message names the file (and
tensor). Never a partial model, never a dead process: the cases that corrupt safetensors
bytes, which the engine maps, run in a child interpreter whose exit must not be a signal.
The header parser itself is fuzzed in test_plan.py.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
from dataclasses import dataclass

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from fasthug_patch.errors import CheckpointPathError
from tests.parity import assert_matches_stock, load_both
from tests.tiny import (
    DTYPE_KWARG,
    assert_exited_normally,
    copy_checkpoint,
    data_offset,
    edit_index,
    json_lines,
    read_safetensors_raw,
    run_python,
    write_safetensors_raw,
)

AUTO = "AutoModelForCausalLM"
SHARD1, SHARD2, SHARD3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def test_the_sharded_layout_has_the_shards_these_cases_name(good):
    assert sorted(f for f in os.listdir(good["sharded"]) if f.endswith(".safetensors")) == [SHARD1, SHARD2, SHARD3]


def _kwargs(dtype):
    return {} if dtype is None else {DTYPE_KWARG: getattr(torch, dtype)}


# --------------------------------------------------------------------------- corrupt bytes
# Each mutates one safetensors file of a copy in place.


def _largest_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


def truncate_mid_tensor(path):
    header, _ = read_safetensors_raw(path)
    begin, end = header[_largest_tensor(header)]["data_offsets"]
    os.truncate(path, data_offset(path) + (begin + end) // 2)


def header_length_past_eof(path):
    header, data = read_safetensors_raw(path)
    write_safetensors_raw(path, header, data, header_len=os.path.getsize(path) * 4)


def header_json_corrupt(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b'{"x":[')


def header_not_an_object(path):
    _, data = read_safetensors_raw(path)
    with open(path, "wb") as f:
        f.write(len(b"[1, 2]  ").to_bytes(8, "little") + b"[1, 2]  " + data)


def empty_file(path):
    open(path, "wb").close()


def offsets_past_eof(path):
    header, data = read_safetensors_raw(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4096, end + 4096]
    write_safetensors_raw(path, header, data)


def overlapping_tensors(path):
    header, data = read_safetensors_raw(path)
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [0, end - begin]  # on top of the first tensor
    write_safetensors_raw(path, header, data)


def unaligned_data(path):
    """Valid, but the data region starts at an odd offset: every tensor is unaligned."""
    header, data = read_safetensors_raw(path)
    raw = json.dumps(header).encode()
    raw += b" " * (1 if len(raw) % 2 == 0 else 2)  # odd length: data starts at an odd offset
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


@dataclass
class ByteCase:
    name: str
    kind: str  # good checkpoint it derives from
    file: str  # the file it breaks
    mutate: object
    stock_raises: bool = True
    dtype: str | None = None
    same_message: bool = True


BYTE_CASES = [
    ByteCase("truncated-mid-tensor", "single", "model.safetensors", truncate_mid_tensor),
    ByteCase("truncated-shard", "sharded", SHARD2, truncate_mid_tensor),
    ByteCase("truncated-mid-tensor-cast", "single", "model.safetensors", truncate_mid_tensor, dtype="float32"),
    ByteCase("header-length-past-eof", "single", "model.safetensors", header_length_past_eof),
    ByteCase("header-json-corrupt", "sharded", SHARD3, header_json_corrupt),
    ByteCase("header-not-an-object", "single", "model.safetensors", header_not_an_object),
    ByteCase("empty-shard", "sharded", SHARD1, empty_file),
    ByteCase("offsets-past-eof", "single", "model.safetensors", offsets_past_eof),
    # safetensors names whichever tensor it meets first, and its map is unordered
    ByteCase("overlapping-tensors", "single", "model.safetensors", overlapping_tensors, same_message=False),
    ByteCase("unaligned-data", "single", "model.safetensors", unaligned_data, stock_raises=False),
    ByteCase("unaligned-data-cast", "sharded", SHARD2, unaligned_data, stock_raises=False, dtype="float32"),
]

# Loads each case with stock then the patch, in a child interpreter, and prints one JSON
# line per case: {"start": name} before, the verdict of assert_matches_stock after.
CHILD = """
import json, sys
import torch
import fasthug_patch
from tests.parity import assert_matches_stock, load_both
from tests.tiny import DTYPE_KWARG

cases = json.load(open(sys.argv[1]))
for case in cases:
    print(json.dumps({"start": case["name"]}), flush=True)
    if case.get("must_be_unreadable"):
        try:
            open(case["must_be_unreadable"], "rb").close()
        except PermissionError:
            pass
        else:
            print(json.dumps({"cannot_simulate": case["name"]}), flush=True)
            continue
    kwargs = {DTYPE_KWARG: getattr(torch, case["dtype"])} if case.get("dtype") else {}
    outcome = load_both("AutoModelForCausalLM", case["path"], **kwargs)
    try:
        assert_matches_stock(outcome, names=case.get("names", ()), same_message=case.get("same_message", True),
                             context=case["name"])
        failure = None
    except AssertionError as exc:
        failure = str(exc)
    report = outcome.report
    print(json.dumps({
        "case": case["name"], "failure": failure, "stock_raised": outcome.stock_raised,
        "stock_error": repr(outcome.stock_error), "fast_error": repr(outcome.fast_error),
        "path": report.path if report else None, "reason": report.reason if report else None,
    }), flush=True)
"""


def run_cases_in_child(cases: list[dict], tmp_dir: str, **popen) -> dict[str, dict]:
    spec = os.path.join(tmp_dir, "cases.json")
    with open(spec, "w") as f:
        json.dump(cases, f)
    proc = run_python(CHILD, args=[spec], timeout=300, **popen)
    assert_exited_normally(proc)
    lines = json_lines(proc.stdout)
    started = [line["start"] for line in lines if "start" in line]
    assert proc.returncode == 0, f"child failed after starting {started[-1:]}:\n{proc.stderr[-4000:]}"
    return {line.get("case") or line.get("cannot_simulate"): line for line in lines if "start" not in line}


@pytest.fixture(scope="module")
def byte_case_results(good, tmp_path_factory):
    root = tmp_path_factory.mktemp("bytes")
    cases = []
    for case in BYTE_CASES:
        path = copy_checkpoint(good[case.kind], str(root / case.name))
        case.mutate(os.path.join(path, case.file))
        cases.append(dict(name=case.name, path=path, dtype=case.dtype, same_message=case.same_message,
                          names=[os.path.join(path, case.file)]))
    return run_cases_in_child(cases, str(root))


@pytest.mark.parametrize("case", BYTE_CASES, ids=lambda c: c.name)
def test_corrupt_safetensors_bytes(case, byte_case_results):
    result = byte_case_results[case.name]
    assert result["stock_raised"] == case.stock_raises, result  # the corpus breaks what it says
    assert result["failure"] is None, result["failure"]
    assert result["path"] in ("fast", "fallback"), result


def test_unreadable_shard(derive, tmp_path):
    """Permission denied for everyone (stock included). Tests run as root, whom mode 000 does
    not stop, so the child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding
    set before exec: a root process without them obeys file modes."""
    path = derive("sharded", "unreadable")
    shard = os.path.join(path, SHARD2)
    os.chmod(shard, 0)

    def drop_dac_capabilities():
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP; failure shows as "cannot simulate"

    case = dict(name="unreadable", path=path, must_be_unreadable=shard, names=[shard])
    try:
        results = run_cases_in_child([case], str(tmp_path), preexec_fn=drop_dac_capabilities)
    finally:
        os.chmod(shard, 0o644)
    if "unreadable" in results and results["unreadable"].get("cannot_simulate"):
        pytest.skip("cannot make a file unreadable here (no CAP_SETPCAP to drop DAC capabilities)")
    result = results["unreadable"]
    assert result["stock_raised"] and result["failure"] is None, result


def test_shard_unreadable_to_the_plugin_only_falls_back(derive, monkeypatch):
    """Only the plugin's own read fails (stock reads in Rust): the load goes stock, same model."""
    path = derive("sharded", "plugin-cannot-read")
    shard = os.path.realpath(os.path.join(path, SHARD2))
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == shard:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)
    outcome = load_both(AUTO, path)
    monkeypatch.undo()
    assert_matches_stock(outcome)
    assert outcome.report.path == "fallback"
    assert shard in outcome.report.reason and "Permission denied" in outcome.report.reason


# --------------------------------------------------------------------------- what the config expects


def _resave(path: str, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [None, "float16", "float32"])
def test_tensor_dtype_disagrees_with_config(derive, dtype):
    path = derive("single", "f32-norm")
    _resave(os.path.join(path, "model.safetensors"),
            lambda sd: sd.__setitem__("model.norm.weight", sd["model.norm.weight"].float() + 0.125))
    outcome = load_both(AUTO, path, **_kwargs(dtype))
    assert not outcome.stock_raised
    assert_matches_stock(outcome)


def test_integer_tensor_where_config_has_a_float_weight(derive):
    path = derive("single", "int-norm")
    _resave(os.path.join(path, "model.safetensors"),
            lambda sd: sd.__setitem__("model.norm.weight", torch.arange(32, dtype=torch.int32)))
    assert_matches_stock(load_both(AUTO, path))  # 4.57 raises, 5.x casts


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("tensor, shape", [("model.norm.weight", (33,)), ("model.embed_tokens.weight", (100, 32))])
def test_tensor_shape_disagrees_with_config(derive, tensor, shape, ignore):
    path = derive("single", "shape")
    _resave(os.path.join(path, "model.safetensors"), lambda sd: sd.__setitem__(tensor, torch.ones(shape, dtype=torch.bfloat16)))
    outcome = load_both(AUTO, path, **({"ignore_mismatched_sizes": True} if ignore else {}))
    assert outcome.stock_raised is not ignore
    assert_matches_stock(outcome)


def test_extra_zero_size_and_scalar_tensors(derive):
    path = derive("single", "extras")

    def add(sd):
        sd["extra.empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
        sd["extra.scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)

    _resave(os.path.join(path, "model.safetensors"), add)
    outcome = load_both(AUTO, path)
    assert_matches_stock(outcome)
    assert outcome.report.path == "fast"


class ScalarConfig(transformers.PretrainedConfig):
    model_type = "fasthug_scalar_test"

    def __init__(self, width: int = 4, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class ScalarModel(transformers.PreTrainedModel):
    """A model whose weights include a scalar and a zero-size parameter and a scalar int
    buffer, so both go through the fast path into the model."""

    config_class = ScalarConfig
    base_model_prefix = "scalar"

    def __init__(self, config):
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.empty = nn.Parameter(torch.zeros(0, config.width))
        self.proj = nn.Linear(config.width, config.width)
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, x):
        return self.proj(x) * self.scale


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_zero_size_and_scalar_weights_load_on_the_fast_path(tmp_path, dtype):
    torch.manual_seed(3)
    model = ScalarModel(ScalarConfig())
    with torch.no_grad():
        model.scale.fill_(2.25)
        model.count.fill_(11)
    model.save_pretrained(str(tmp_path / "scalar"))
    outcome = load_both(ScalarModel, str(tmp_path / "scalar"), **_kwargs(dtype))
    assert_matches_stock(outcome)
    assert outcome.report.path == "fast"
    assert outcome.fast.scale.shape == () and outcome.fast.empty.shape == (0, 4)


# --------------------------------------------------------------------------- sharded index


def _first_key_in(weight_map: dict, shard: str) -> str:
    return sorted(k for k, v in weight_map.items() if v == shard)[0]


def test_index_names_a_missing_shard(derive):
    path = derive("sharded", "missing-shard")
    edit_index(path, lambda wm: wm.__setitem__("model.norm.weight", "model-00009-of-00009.safetensors"))
    outcome = load_both(AUTO, path)
    assert isinstance(outcome.stock_error, FileNotFoundError)
    assert_matches_stock(outcome)


def test_shard_file_deleted(derive):
    path = derive("sharded", "deleted-shard")
    os.remove(os.path.join(path, SHARD2))
    outcome = load_both(AUTO, path)
    assert outcome.stock_raised
    assert_matches_stock(outcome)


def test_index_claims_the_wrong_shard(derive):
    """The index puts a tensor in shard 1; it lives in shard 3. Stock reads what the files
    hold, and so does the patch."""
    path = derive("sharded", "wrong-claim")
    edit_index(path, lambda wm: wm.__setitem__(_first_key_in(wm, SHARD3), SHARD1))
    outcome = load_both(AUTO, path)
    assert not outcome.stock_raised
    assert_matches_stock(outcome)


def test_index_claims_a_tensor_no_shard_holds(derive):
    path = derive("sharded", "phantom")
    edit_index(path, lambda wm: wm.__setitem__("model.phantom.weight", SHARD1))
    assert_matches_stock(load_both(AUTO, path))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors"])
@pytest.mark.parametrize("exists", [True, False])
def test_index_names_a_file_outside_the_directory(derive, tmp_path, entry, exists):
    """Stock joins the name onto the directory and reads whatever is there (or raises
    FileNotFoundError). The patch refuses either way: CheckpointPathError is a subclass of
    stock's FileNotFoundError naming the file. tests/test_security.py has more."""
    path = derive("sharded", "escape")
    os.mkdir(os.path.join(path, "sub"))
    if exists:
        os.replace(os.path.join(path, SHARD2), os.path.join(tmp_path, "outside.safetensors"))
    edit_index(path, lambda wm: wm.update({k: entry for k, v in list(wm.items()) if v == SHARD2}))
    outcome = load_both(AUTO, path)
    assert isinstance(outcome.fast_error, CheckpointPathError), outcome.fast_error
    assert entry in str(outcome.fast_error) and path in str(outcome.fast_error)
    if exists:
        assert outcome.stock_error is None  # stock read the outside file without a word
    else:
        assert_matches_stock(outcome, names=[entry])


def test_same_tensor_in_two_shards(derive):
    path = derive("sharded", "duplicate")
    weight_map = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    name = _first_key_in(weight_map, SHARD3)
    shard1 = os.path.join(path, SHARD1)
    _resave(shard1, lambda sd: sd.__setitem__(name, torch.full_like(load_file(os.path.join(path, SHARD3))[name], 0.5)))
    outcome = load_both(AUTO, path)
    assert not outcome.stock_raised
    assert_matches_stock(outcome)
    if outcome.report.path == "fallback":  # 5.x: the plugin sees all files at once and declines
        assert "also present" in outcome.report.reason and name in outcome.report.reason


# --------------------------------------------------------------------------- .bin


def _resave_bin(directory: str, edit) -> None:
    path = os.path.join(directory, "pytorch_model.bin")
    state = torch.load(path, weights_only=True)
    state = edit(state) or state
    torch.save(state, path)


BIN_EDITS = {
    "non-tensor-extras": lambda sd: sd.update({"extra.int": 3, "extra.str": "x", "extra.list": [1, 2], "extra.none": None}),
    "non-tensor-weight": lambda sd: sd.__setitem__("model.norm.weight", [1.0] * 32),
    "not-a-dict": lambda sd: [1, 2, 3],
    "non-contiguous-weight": lambda sd: sd.__setitem__(
        "model.embed_tokens.weight", sd["model.embed_tokens.weight"].t().contiguous().t()
    ),
    "shared-storage": lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"]),
}


@pytest.mark.parametrize("edit", sorted(BIN_EDITS))
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_bin_with_unexpected_contents(derive, edit, dtype):
    path = derive("bin", "bin-" + edit)
    _resave_bin(path, BIN_EDITS[edit])
    assert_matches_stock(load_both(AUTO, path, **_kwargs(dtype)))
