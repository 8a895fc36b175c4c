"""FASTHUG_* settings the plugin cannot use are named, with what it does instead
(fasthug_patch/settings_check.py), and ``fasthug-patch env`` shows every setting."""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

from fasthug_patch import env_report, settings, settings_check
from tests.tiny import run_python

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = re.compile(r"FASTHUG_[A-Z0-9_]*[A-Z0-9]")

# (name, a value used as given, a value the plugin cannot use, what the message must say,
#  the reader and what it gives for that value)
CASES = [
    ("FASTHUG_IO", "direct", "odirect", "using auto", settings.io_mode, "auto"),
    ("FASTHUG_THREADS", "8", "eight", "using the default, 16", settings.reader_threads, 16),
    ("FASTHUG_CHUNK_MB", "4", "0", "below 1; using 1", settings.chunk_bytes, 1 << 20),
    ("FASTHUG_CAST_THREADS", "1", "-2", "below 1; using 1", settings.cast_threads, 1),
    ("FASTHUG_PIN_CHUNK_MB", "64", "64MB", "using the default, 256", settings.pin_chunk_bytes, 256 << 20),
    ("FASTHUG_RING", "8x64", "8*64", "using the default ring, 16x32", settings.ring_shape, (16, 32 << 20)),
    ("FASTHUG_RING", "8x64", "0x64", "below 1; using 1 for it", settings.ring_shape, (1, 64 << 20)),
    ("FASTHUG_MEMORY_AVAILABLE_MB", "512", "lots", "the memory the machine reports", settings.memory_available_override,
     None),
    ("FASTHUG_DIST_TIMEOUT_S", "2.5", "soon", "using the default, 600 s", settings.dist_timeout_seconds, 600.0),
    ("FASTHUG_HUGE_PAGES", "on", "enabled", "counted as unset (off)", settings.huge_pages, False),
    ("FASTHUG_CAST_AHEAD", "0", "nope", "counted as unset (on)", settings.cast_ahead, True),
    ("FASTHUG_STREAM_TO_DEVICE", "no", "never", "counted as unset (on)", settings.stream_model_moves, True),
    ("FASTHUG_UNVERIFIED_GPU", "1", "y", "counted as unset (off)", settings.unverified_gpu_paths, False),
    ("FASTHUG_ALLOW_UNTESTED", "true", "2", "counted as unset (off)", settings.allow_untested_versions, False),
    ("FASTHUG_POPULATE", "1", "always", "counted as unset (auto)", settings.populate_mapped, None),
    ("FASTHUG_PIN_FILES", "1", "yes please", "counted as unset (off)", settings.pin_cached_files, False),
    ("FASTHUG_DIST", "0", "off!", "counted as unset (on", settings.dist_sharing, None),
    ("FASTHUG_ENABLE", "0", "maybe", "counted as unset (importing fasthug_patch turns it on",
     lambda: settings.env_flag(settings.ENABLE_VAR), None),
]


@pytest.mark.parametrize("name, good, bad, says, reader, gives", CASES, ids=[f"{c[0]}={c[2]}" for c in CASES])
def test_a_value_the_plugin_cannot_use_is_named_with_what_it_does_instead(name, good, bad, says, reader, gives,
                                                                          monkeypatch):
    assert settings_check.problems({name: good}) == []
    found = settings_check.problems({name: bad})
    assert len(found) == 1 and found[0].startswith(f"{name}={bad!r}") and says in found[0], found
    monkeypatch.setenv(name, bad)
    assert reader() == gives, "the message no longer says what the reader does"


def test_unknown_names_are_named_with_the_closest_setting():
    found = settings_check.problems({"FASTHUG_THREAD": "4", "FASTHUG_ZZZ": "1"})
    assert found == [
        "FASTHUG_THREAD is not a setting fasthug_patch reads (did you mean FASTHUG_THREADS?); ignored",
        "FASTHUG_ZZZ is not a setting fasthug_patch reads; ignored",
    ]


def test_good_empty_tool_and_foreign_variables_are_not_problems():
    environ = {name: "" for name in settings_check.CHECKS}  # empty counts as unset, silently
    environ.update({name: "x" for name in settings_check.TOOL_VARS})
    environ.update({"FASTHUG_IO": "mmap", "FASTHUG_ENABLE": "0", "FASTHUG_DIST_HOST": "node-1", "PATH": "/bin"})
    assert settings_check.problems(environ) == []


def _fasthug_names_read_in(directory: pathlib.Path) -> set[str]:
    names = set()
    for file in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.fullmatch(node.value):
                names.add(node.value)
    return names


def test_every_variable_the_package_reads_is_checked_or_a_tool_variable():
    read = _fasthug_names_read_in(ROOT / "fasthug_patch")
    unknown = read - set(settings_check.CHECKS) - settings_check.TOOL_VARS
    assert not unknown, f"add to settings_check.CHECKS (a setting) or TOOL_VARS (a tool's): {sorted(unknown)}"


def test_env_report_lists_every_setting_and_the_readme_documents_them():
    assert set(env_report.DEFAULTS) == set(settings_check.CHECKS)
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in settings_check.CHECKS if f"`{name}`" not in readme]
    assert not missing, f"document in README.md's settings table: {missing}"


def test_importing_the_plugin_warns_once_per_setting_it_cannot_use():
    proc = run_python("""
        import warnings
        warnings.simplefilter("always")  # every call would show: only the plugin's own once keeps it to one
        import fasthug_patch, importlib
        from fasthug_patch import settings_check
        settings_check.warn_once()
        print("imported")
    """, env={"FASTHUG_IO": "odirect", "FASTHUG_THREAD": "4"})
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "UserWarning: fasthug_patch:" in line]
    assert len(lines) == 2, proc.stderr
    assert "FASTHUG_IO='odirect' is not one of auto, mmap, read, direct; using auto" in lines[0]
    assert "did you mean FASTHUG_THREADS?" in lines[1]
    assert all(line.startswith("<string>:") for line in lines), "the warning should point at the import"


def test_importing_with_good_settings_is_silent():
    proc = run_python("import warnings; warnings.simplefilter('error'); import fasthug_patch; print('ok')",
                      env={"FASTHUG_IO": "auto", "FASTHUG_THREADS": "8", "FASTHUG_CACHE": "/tmp/x"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_env_command_shows_versions_status_and_settings():
    import transformers

    proc = run_python(
        "import sys; from fasthug_patch.cli import main; sys.exit(main(['env']))",
        env={"FASTHUG_IO": "direct", "FASTHUG_RING": "bad"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"transformers {transformers.__version__}: adapter " in out
    assert f"python {sys.version.split()[0]}" in out
    assert "startup hook: " in out and "machine: " in out
    for name in settings_check.CHECKS:
        assert f"  {name} " in out, name
    assert "FASTHUG_IO" in out and "'direct'" in out
    assert out.rstrip().endswith("FASTHUG_RING='bad' is not SLOTSxMIB (e.g. 8x64); using the default ring, 16x32")


def test_transformers_status_follows_the_capability_table(monkeypatch):
    monkeypatch.delenv("FASTHUG_ALLOW_UNTESTED", raising=False)
    assert env_report.transformers_status("4.57.6") == "4.57.6: adapter v4, a tested line"
    assert "untested line: loads go to stock unless FASTHUG_ALLOW_UNTESTED=1" in env_report.transformers_status("5.9999.0")
    assert "no adapter for this line" in env_report.transformers_status("4.30.0")
    monkeypatch.setenv("FASTHUG_ALLOW_UNTESTED", "1")
    assert "tried because FASTHUG_ALLOW_UNTESTED is on" in env_report.transformers_status("5.9999.0")


def test_startup_hook_found_or_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert env_report.startup_hook().startswith("not found on sys.path")
    (tmp_path / "fasthug_patch.pth").write_text("")
    assert env_report.startup_hook() == f"installed ({tmp_path / 'fasthug_patch.pth'})"


def test_ranks_group_by_the_dist_host_setting(monkeypatch):
    monkeypatch.delenv("FASTHUG_DIST_HOST", raising=False)
    assert settings.dist_host("box") == "box"
    monkeypatch.setenv("FASTHUG_DIST_HOST", " node-7 ")
    assert settings.dist_host("box") == "node-7"
