"""Security: with the patch on, nothing is unpickled beyond what torch's weights_only
loader allows, remote code runs exactly when stock runs it, and no weight file outside the
checkpoint directory is read.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from fasthug_patch import capabilities
from fasthug_patch.adapters.base import check_checkpoint_paths
from fasthug_patch.errors import CheckpointPathError
from tests.parity import assert_matches_stock, load_both
from tests.tiny import (
    IS_V5,
    ROOT,
    copy_checkpoint,
    edit_index,
    json_lines,
    run_python,
)

AUTO = "AutoModelForCausalLM"
SHARD1, SHARD2 = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"


# --------------------------------------------------------------------------- pickles


class WritesMarker:
    """Unpickling this creates the directory ``path``: proof that the pickle ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("where", ["extra-key", "in-place-of-a-weight"])
@pytest.mark.parametrize("kind", ["single", "bin-sharded"])
def test_malicious_pickle_never_runs(good, derive, tmp_path, kind, where, legacy_format):
    if kind == "single":
        path = derive("single", "evil")
        state = load_file(os.path.join(path, "model.safetensors"))
        os.remove(os.path.join(path, "model.safetensors"))
        target = os.path.join(path, "pytorch_model.bin")
    else:
        path = derive("bin-sharded", "evil")
        target = os.path.join(path, "pytorch_model-00002-of-00003.bin")
        state = torch.load(target, weights_only=True)
    marker = str(tmp_path / "pickle-ran")
    key = "extra.payload" if where == "extra-key" else sorted(state)[0]
    state[key] = WritesMarker(marker)
    torch.save(state, target, _use_new_zipfile_serialization=not legacy_format)

    outcome = load_both(AUTO, path)
    assert not os.path.exists(marker), "the pickle ran code"
    assert outcome.stock_raised
    assert_matches_stock(outcome)  # stock's weights_only refusal, unchanged
    assert "weights_only" in str(outcome.fast_error) or "Unable to load weights" in str(outcome.fast_error)


def test_the_plugin_never_unpickles_by_itself():
    """No module of the package calls an unpickler: .bin files are only ever read by stock
    transformers (weights_only=True), the plugin sees the tensors it returned."""
    forbidden = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                 ("marshal", "loads"), ("dill", "load"), ("numpy", "load"), ("np", "load")}
    offenders = []
    for file in pathlib.Path(ROOT, "fasthug_patch").rglob("*.py"):
        tree = ast.parse(file.read_text(), str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if (node.value.id, node.attr) in forbidden:
                    offenders.append(f"{file}:{node.lineno}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.keyword) and node.arg == "weights_only":
                offenders.append(f"{file}:{node.lineno}: weights_only=")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for n in names):
                    offenders.append(f"{file}:{node.lineno}: imports {names}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- remote code

CUSTOM_CODE = """
with open({marker!r}, "a") as f:
    f.write("remote code ran\\n")

from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "fasthug_custom"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""

REMOTE_CODE_CHILD = """
import json, os, sys
import fasthug_patch
from transformers import AutoModelForCausalLM
from tests.tiny import model_digest

path, marker = sys.argv[1], sys.argv[2]
out = {}

def ran():
    return os.path.exists(marker)

def attempt(scope, **kwargs):
    try:
        with scope():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        return {"digest": model_digest(model), "class": type(model).__name__, "module": type(model).__module__}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}

try:
    out["explain"] = str(fasthug_patch.explain(path))
except Exception as exc:
    out["explain"] = f"{type(exc).__name__}: {exc}"
out["ran_after_explain"] = ran()
for trust in ("unset", False):
    kwargs = {} if trust == "unset" else {"trust_remote_code": trust}
    out[f"stock_{trust}"] = attempt(fasthug_patch.disabled, **kwargs)
    out[f"fast_{trust}"] = attempt(fasthug_patch.enabled, **kwargs)
out["ran_without_trust"] = ran()
out["stock_trusted"] = attempt(fasthug_patch.disabled, trust_remote_code=True)
out["fast_trusted"] = attempt(fasthug_patch.enabled, trust_remote_code=True)
report = fasthug_patch.last_report()
out["report"] = [report.path, report.reason]
out["ran_with_trust"] = ran()
print()  # ends stock's "[y/N]" prompt line
print(json.dumps(out), flush=True)
"""


def test_remote_code_runs_exactly_when_stock_runs_it(good, tmp_path):
    path = copy_checkpoint(good["single"], str(tmp_path / "custom"))
    marker = str(tmp_path / "remote-code-ran")
    with open(os.path.join(path, "custom.py"), "w") as f:
        f.write(CUSTOM_CODE.format(marker=marker))
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(model_type="fasthug_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    json.dump(config, open(config_path, "w"))

    proc = run_python(
        REMOTE_CODE_CHILD, args=[path, marker], stdin=subprocess.DEVNULL, timeout=300,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json_lines(proc.stdout)[-1]
    assert not out["ran_after_explain"], out["explain"]
    assert not out["ran_without_trust"]
    for trust in ("unset", "False"):
        stock, fast = out[f"stock_{trust}"], out[f"fast_{trust}"]
        assert "error" in stock and fast == stock, (trust, stock, fast)  # stock's refusal, word for word
    assert out["ran_with_trust"]
    stock, fast = out["stock_trusted"], out["fast_trusted"]
    assert "digest" in stock and fast == stock, (stock, fast)
    assert stock["module"].startswith("transformers_modules")
    assert out["report"][0] == "fallback" and "remote code" in out["report"][1], out["report"]


# --------------------------------------------------------------------------- paths outside the checkpoint


def _move_shard_out(path: str, shard: str, entry: str, outside: str | None) -> None:
    """Point every tensor of ``shard`` at ``entry`` in the index; move the shard to ``outside``
    (or delete it)."""
    if outside is None:
        os.remove(os.path.join(path, shard))
    else:
        os.replace(os.path.join(path, shard), outside)
    index = "model.safetensors.index.json" if shard.endswith(".safetensors") else "pytorch_model.bin.index.json"
    edit_index(path, lambda wm: wm.update({k: entry for k, v in list(wm.items()) if v == shard}), name=index)


def _assert_refused(outcome, entry: str) -> None:
    error = outcome.fast_error
    assert isinstance(error, CheckpointPathError), repr(error)
    assert isinstance(error, FileNotFoundError) and isinstance(error, ValueError)
    assert entry in str(error) and "outside the checkpoint directory" in str(error)
    report = outcome.report
    assert report is not None and report.path == "fallback"
    assert report.bytes == 0 and report.tensors_mapped == 0 and report.tensors_cast == 0  # nothing read


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_index_entry_outside_the_directory_is_refused(derive, tmp_path, how):
    path = derive("sharded", "escape")
    outside = str(tmp_path / "elsewhere.safetensors")
    entry = "../elsewhere.safetensors" if how == "relative" else outside
    _move_shard_out(path, SHARD2, entry, outside)
    outcome = load_both(AUTO, path)
    assert outcome.stock_error is None, "stock reads the outside file (the hole this closes)"
    _assert_refused(outcome, entry)


@pytest.mark.parametrize("entry", ["../gone.safetensors", "/nonexistent/gone.safetensors"])
def test_missing_outside_file_is_stock_error_made_clearer(derive, entry):
    path = derive("sharded", "escape-missing")
    _move_shard_out(path, SHARD2, entry, None)
    outcome = load_both(AUTO, path)
    assert isinstance(outcome.stock_error, FileNotFoundError)
    _assert_refused(outcome, entry)
    assert_matches_stock(outcome, names=[entry])  # a subclass of stock's error, naming the file


def test_bin_index_entry_outside_the_directory_is_refused(derive, tmp_path):
    path = derive("bin-sharded", "escape-bin")
    outside = str(tmp_path / "elsewhere.bin")
    _move_shard_out(path, "pytorch_model-00002-of-00003.bin", "../elsewhere.bin", outside)
    _assert_refused(load_both(AUTO, path), "../elsewhere.bin")


def test_escape_from_a_subfolder_is_refused(good, tmp_path):
    """With subfolder=, the checkpoint directory is the subfolder: a shard next to it is outside."""
    root = tmp_path / "repo"
    path = copy_checkpoint(good["sharded"], str(root / "sub"))
    _move_shard_out(path, SHARD2, f"../{SHARD2}", str(root / SHARD2))
    _assert_refused(load_both(AUTO, str(root), subfolder="sub"), f"../{SHARD2}")


def test_refused_on_the_stock_path_too(derive, tmp_path, monkeypatch):
    """A call the capability table sends to stock is still refused while the patch is on;
    only disabled() (the user's explicit choice) gives stock's behaviour."""
    path = derive("sharded", "escape-declined")
    _move_shard_out(path, SHARD2, "../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors"))
    real = capabilities.decide
    monkeypatch.setattr(capabilities, "decide", lambda facts, stage: (
        capabilities.Decision(False, "declined by test", "test") if stage == "call" else real(facts, stage)))
    outcome = load_both(AUTO, path)
    assert outcome.stock_error is None
    _assert_refused(outcome, "../elsewhere.safetensors")
    assert outcome.report.reason == "declined by test"


def test_transformers_weights_outside_the_directory(derive, tmp_path):
    """config.json's ``transformers_weights`` names the weights file. 5.x stock refuses a
    path escaping the directory with ValueError; 4.57 stock reads it. With the patch, both
    lines refuse with a ValueError."""
    path = derive("single", "explicit")
    os.replace(os.path.join(path, "model.safetensors"), tmp_path / "elsewhere.safetensors")
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config["transformers_weights"] = "../elsewhere.safetensors"
    json.dump(config, open(config_path, "w"))
    outcome = load_both(AUTO, path)
    assert isinstance(outcome.fast_error, ValueError), repr(outcome.fast_error)
    if IS_V5:
        assert_matches_stock(outcome)  # stock's own check, unchanged
    else:
        assert outcome.stock_error is None
        assert isinstance(outcome.fast_error, CheckpointPathError) and "elsewhere.safetensors" in str(outcome.fast_error)


def test_symlinks_inside_the_directory_are_allowed(good, tmp_path):
    """The hub cache's layout: snapshot files are symlinks into ../../blobs. Lexically inside,
    so loaded (fast) like any checkpoint."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for name in os.listdir(good["sharded"]):
        blob = blobs / f"blob-{name}"
        blob.write_bytes(pathlib.Path(good["sharded"], name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    outcome = load_both(AUTO, str(snapshot))
    assert_matches_stock(outcome)
    assert outcome.report.path == "fast"


@pytest.mark.parametrize(
    "entry, model_path, refused",
    [
        ("../x.safetensors", "org/model", True),  # a hub id: the index entry alone decides
        ("/etc/x.safetensors", "org/model", True),
        ("a/../../x.safetensors", "org/model", True),
        ("a/../x.safetensors", "org/model", False),
        ("sub/x.safetensors", "org/model", False),
        ("x..y.safetensors", "org/model", False),
    ],
)
def test_check_checkpoint_paths(entry, model_path, refused):
    metadata = {"weight_map": {"w": entry}}
    if refused:
        with pytest.raises(CheckpointPathError, match="outside the checkpoint directory"):
            check_checkpoint_paths([entry], metadata, model_path, "")
    else:
        check_checkpoint_paths([entry], metadata, model_path, "")

