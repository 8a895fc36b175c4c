"""The version table: which adapter serves which transformers line, what is tested, what CI
runs, and how the matrix's results become docs/compatibility.md.

The adapters themselves are proven by the architecture sweep, run on every line by
scripts/matrix.py (and on 4.43, 4.50, 4.57 and 5.23 by scripts/run_tests.sh)."""

from __future__ import annotations

import pathlib
import re

import pytest

from fasthug_patch import capabilities, compat_doc, loadcall
from fasthug_patch.capabilities import Facts

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "version, line",
    [("4.42.4", None), ("4.43.0", "v4_legacy"), ("4.49.0", "v4_legacy"), ("4.50.3", "v4"), ("4.57.6", "v4"),
     ("5.0.0", "v5"), ("5.23.0", "v5"), ("5.24.0.dev0", "v5"), ("6.0.0", None)],
)
def test_adapter_line(version, line):
    assert capabilities.adapter_line(version) == line


def test_every_minor_line_from_the_oldest_to_the_newest_is_tested():
    minors = sorted(capabilities.TESTED)
    for major in (4, 5):
        line = [m for (j, m) in minors if j == major]
        assert line == list(range(line[0], line[-1] + 1)), f"a gap in the {major}.x lines: {line}"
    for minor, release in capabilities.TESTED.items():
        assert capabilities.version_tuple(release) == minor, release
        assert capabilities.adapter_line(release) is not None, release


def test_a_newer_release_than_the_table_is_stock_and_named(monkeypatch):
    monkeypatch.delenv("FASTHUG_ALLOW_UNTESTED", raising=False)
    newest = max(capabilities.TESTED)
    newer = f"{newest[0]}.{newest[1] + 1}.0"
    decision = capabilities.decide(Facts(transformers_version=newer), "call")
    assert not decision.fast and decision.rule == "untested-version"
    assert newer in decision.reason and "FASTHUG_ALLOW_UNTESTED" in decision.reason
    monkeypatch.setenv("FASTHUG_ALLOW_UNTESTED", "1")
    assert capabilities.decide(Facts(transformers_version=newer), "call").fast
    older = capabilities.decide(Facts(transformers_version="4.42.4"), "call")
    assert older.rule == "no-adapter" and "4.42.4" in older.reason


def test_ci_runs_the_subset_the_table_names():
    """scripts/run_tests.sh's default lines are capabilities.CI_SUBSET's releases."""
    script = (ROOT / "scripts" / "run_tests.sh").read_text()
    full = re.search(r'FASTHUG_TEST_LINES:-([^}"]*)', script).group(1).split()
    subset = re.search(r'FASTHUG_SUBSET_LINES-([^}"]*)', script).group(1).split()
    assert sorted(full + subset) == sorted(capabilities.TESTED[m] for m in capabilities.CI_SUBSET)


def test_skipping_stock_gc_collect_only_inside_a_fast_load():
    from fasthug_patch.adapters.v4_legacy import _skip_collect_during_fast_load

    calls = []

    def collect(*args):
        calls.append(args)
        return 7

    assert _skip_collect_during_fast_load(collect, None, (), {}) == 7
    with loadcall.LoadCall(report=None):
        assert _skip_collect_during_fast_load(collect, None, (), {}) == 0
        assert _skip_collect_during_fast_load(collect, None, (2,), {}) == 7  # an explicit generation: theirs
    assert calls == [(), (2,)]


def _record(version, archs, failed=0, cases=None):
    return {
        "transformers": version,
        "architectures": {name: {"family": fam, "path": path, "reason": reason} for name, fam, path, reason in archs},
        "cases": cases or {},
        "not_buildable": ["qwen3"],
        "tests": {"passed": 10, "failed": failed, "skipped": 0},
    }


def test_matrix_table_counts_what_the_records_say():
    records = [
        _record("5.0.0", [("llama", "causal", "fast", ""), ("bert", "encoder", "fast", "")], cases={"a": "fast"}),
        _record("4.43.4", [("llama", "causal", "fast", ""), ("gptj", "causal", "fallback", "why not")], failed=2,
                cases={"a": "fast", "b": "fallback"}),
    ]
    text = "\n".join(compat_doc.render_matrix(records))
    rows = [line for line in text.splitlines() if line.startswith("| 4.") or line.startswith("| 5.")]
    assert rows[0].startswith("| 4.43.4 | 10, **2 failed** | 1/2 | – |")
    assert "1/2 (50%) | 1/2 | 1 |" in rows[0]
    assert rows[1].startswith("| 5.0.0 | 10 | 1/1 | 1/1 |") and "2/2 (100%)" in rows[1]
    assert "- gptj: why not (4.43.4)" in text


def test_committed_matrix_results_meet_the_bar():
    """Every record in docs/matrix is of a tested release; each passed, and took the fast
    path for >= 90% of the architectures that line can build. Lines not run are listed as
    such in docs/compatibility.md (test_fallback checks the file is current)."""
    records = {r["transformers"]: r for r in compat_doc.load_matrix()}
    assert records and set(records) <= set(capabilities.TESTED.values())
    for version, record in records.items():
        archs = record["architectures"]
        assert record["tests"]["failed"] == 0 and record["exit_code"] == 0, version
        fast = sum(a["path"] == "fast" for a in archs.values())
        assert archs and fast / len(archs) >= 0.9, (version, fast, len(archs))
