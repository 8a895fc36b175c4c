"""Render docs/compatibility.md from the capability table and the compatibility matrix's
results (docs/matrix/<version>.json, written by scripts/matrix.py); never typed by hand.

    python -m fasthug_patch.compat_doc            # rewrite docs/compatibility.md
    python -m fasthug_patch.compat_doc --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from fasthug_patch import capabilities

_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DOC_PATH = os.path.join(_DOCS, "compatibility.md")
MATRIX_DIR = os.path.join(_DOCS, "matrix")
FAMILIES = ("causal", "encoder", "seq2seq", "vision", "audio", "moe")


def render() -> str:
    lines = [
        "# Compatibility",
        "",
        "Generated from `fasthug_patch/capabilities.py` by `python -m fasthug_patch.compat_doc`;",
        "do not edit by hand. The architecture sweep in `tests/test_sweep.py` proves parity",
        "with stock for each tested line.",
        "",
        "## Transformers lines",
        "",
        "| adapter | transformers versions | tested releases |",
        "| --- | --- | --- |",
    ]
    for line, (low, high) in capabilities.ADAPTER_LINES.items():
        tested = ", ".join(v for k, v in capabilities.TESTED.items() if low <= k <= high)
        upper = f"{high[0]}.x" if high[1] >= 99 else f"{high[0]}.{high[1]}.x"
        span = upper if low == high else f"{low[0]}.{low[1]} – {upper}"
        lines.append(f"| {line} | {span} | {tested} |")
    lines += [
        "",
        "A release without an adapter, or not in the tested list, loads with stock transformers and",
        f"the report says why; `{capabilities.settings.ALLOW_UNTESTED_VAR}=1` opts an untested release",
        "of a known line into the fast path.",
        "",
        "## When the stock loader is used",
        "",
        "Rules are checked in order; the first that applies sends the load to stock with its reason.",
        "Stage `call` is checked on entry to `from_pretrained`; stage `load` when transformers has",
        "resolved its loading arguments (device map, quantizer, weight files); `call+load` at both",
        "(a pre-quantised checkpoint names its quantizer only in its config, seen at the load stage).",
        "",
        "| rule | stage | applies when |",
        "| --- | --- | --- |",
    ]
    for rule in capabilities.RULES:
        lines.append(f"| `{rule.key}` | {rule.stage} | {rule.condition} |")
    lines += ["", "Everything else takes the fast path.", ""]
    lines += render_matrix(load_matrix())
    return "\n".join(lines)


def load_matrix(directory: str = MATRIX_DIR) -> list[dict]:
    records = []
    for path in glob.glob(os.path.join(directory, "*.json")):
        with open(path) as f:
            records.append(json.load(f))
    return records


def _release_order(record: dict) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in record["transformers"].split("."))


def _count(archs: list[dict]) -> str:
    if not archs:
        return "–"
    return f"{sum(a['path'] == 'fast' for a in archs)}/{len(archs)}"


def render_matrix(records: list[dict]) -> list[str]:
    """The matrix as run: per version, which path each architecture family's default load took."""
    lines = [
        "## The matrix, as last run",
        "",
        "One environment per transformers release (torch 2.13.0 CPU), each running the architecture",
        "sweep (`tests/test_sweep.py`: every catalogue architecture, stock and patched, compared bit",
        "for bit, plus the dtype/layout/special-case matrix) and the activation tests",
        "(`tests/test_activation.py`). Family cells count the architectures whose default load",
        "(that version's default dtype) took the fast path, out of those the version can build;",
        "`cases` counts every sweep load. Regenerate with `python scripts/matrix.py run`",
        "(`--fast`: the CI subset).",
        "",
    ]
    if not records:
        return lines + ["No matrix results yet.", ""]
    records = sorted(records, key=_release_order)
    head = "| transformers | tests passed | " + " | ".join(FAMILIES) + " | all (fast %) | cases fast | not buildable |"
    lines += [head, "|" + " --- |" * (len(FAMILIES) + 5)]
    stock_reasons: dict[str, list[str]] = {}
    for record in records:
        archs = record.get("architectures", {})
        by_family = {f: [a for a in archs.values() if a["family"] == f] for f in FAMILIES}
        fast = sum(a["path"] == "fast" for a in archs.values())
        share = f"{fast}/{len(archs)} ({100 * fast / len(archs):.0f}%)" if archs else "–"
        cases = record.get("cases", {})
        tests = record.get("tests", {})
        verdict = f"{tests.get('passed', 0)}" + (f", **{tests['failed']} failed**" if tests.get("failed") else "")
        lines.append(
            f"| {record['transformers']} | {verdict} | "
            + " | ".join(_count(by_family[f]) for f in FAMILIES)
            + f" | {share} | {sum(p == 'fast' for p in cases.values())}/{len(cases)}"
            + f" | {len(record.get('not_buildable', []))} |"
        )
        for name, arch in sorted(archs.items()):
            if arch["path"] != "fast":
                stock_reasons.setdefault(f"{name}: {arch['reason']}", []).append(record["transformers"])
    lines.append("")
    ran = {r["transformers"] for r in records}
    missing = [release for release in capabilities.TESTED.values() if release not in ran]
    if missing:
        lines += [f"Not yet run in this table: {', '.join(missing)}.", ""]
    if stock_reasons:
        lines += ["Default loads that took the stock path, and why:", ""]
        lines += [f"- {what} ({', '.join(versions)})" for what, versions in sorted(stock_reasons.items())]
        lines.append("")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = open(DOC_PATH).read() if os.path.exists(DOC_PATH) else ""
        if current != text:
            print(f"{DOC_PATH} is stale: run python -m fasthug_patch.compat_doc", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(DOC_PATH), exist_ok=True)
    with open(DOC_PATH, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
