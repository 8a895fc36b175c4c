"""Render docs/compatibility.md from the capability table (never typed by hand).

    python -m fasthug_patch.compat_doc            # rewrite docs/compatibility.md
    python -m fasthug_patch.compat_doc --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import os
import sys

from fasthug_patch import capabilities

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "compatibility.md")


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
        "the report says why; `{capabilities.settings.ALLOW_UNTESTED_VAR}=1` opts an untested release",
        "of a known line into the fast path.",
        "",
        "## When the stock loader is used",
        "",
        "Rules are checked in order; the first that applies sends the load to stock with its reason.",
        "Stage `call` is checked on entry to `from_pretrained`; stage `load` when transformers has",
        "resolved its loading arguments (device map, quantizer, weight files).",
        "",
        "| rule | stage | applies when |",
        "| --- | --- | --- |",
    ]
    for rule in capabilities.RULES:
        lines.append(f"| `{rule.key}` | {rule.stage} | {rule.condition} |")
    lines += ["", "Everything else takes the fast path.", ""]
    return "\n".join(lines)


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
