#!/usr/bin/env python3
"""The compatibility matrix: one environment per transformers minor line, each checked.

    python scripts/matrix.py build [--fast | VERSION ...]   # make the environments
    python scripts/matrix.py run   [--fast | VERSION ...]   # build, test, record, render
    python scripts/matrix.py render                          # docs/compatibility.md only

``run --all-tests`` runs the whole test suite instead of the sweep and activation tests, and
``--results DIR`` writes the records elsewhere than docs/matrix (and renders nothing):
scripts/run_tests.sh, the README's test command, uses both.

The lines and the release tested on each come from the capability table
(``fasthug_patch.capabilities.TESTED``), so the plugin's "tested" list and the matrix
cannot drift apart. ``--fast`` is the subset CI runs on every submission: the oldest line,
one in the middle, 4.57 and the newest (``capabilities.CI_SUBSET``).

Environments live in ``.matrix/``: ``base`` holds torch 2.13.0 (CPU build) and every other
dependency once; each ``tf-X.Y.Z`` is a small venv that sees ``base`` through a ``.pth``
line and adds only transformers (and the tokenizers / huggingface_hub it pins) and this
package, installed for real so its startup hook is in site-packages. 39 full venvs would
take ~50 GB; this takes ~7 (1.3 GB base, ~140 MB per release).

Each environment runs the architecture sweep and the activation tests with
``FASTHUG_MATRIX_RECORD`` set; the sweep writes the path every architecture's default load
took (docs/matrix/<version>.json), and pytest's own counts are added. ``render`` turns those
files into docs/compatibility.md (``python -m fasthug_patch.compat_doc``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Releases whose declared dependency range admits a later release that breaks them, with
# the pin that restores what their users had. 5.4: huggingface_hub 1.33 (inside its <2.0)
# validates config dataclasses strictly and rejects OlmoConfig / MBartConfig /
# M2M100Config's bool tie_word_embeddings (declared int) in stock and patched alike;
# 1.7.0 accepts them.
EXTRA_PINS = {"5.4.": ["huggingface_hub==1.7.0"]}


def _version_table():
    """capabilities.TESTED and CI_SUBSET, read from the source: this script runs under a bare
    python3 that has none of the package's dependencies (importing it would need wrapt)."""
    tree = ast.parse((ROOT / "fasthug_patch" / "capabilities.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    tested = ast.literal_eval(found["TESTED"])
    subset = eval(compile(ast.Expression(found["CI_SUBSET"]), "capabilities.py", "eval"),  # noqa: S307
                  {"__builtins__": {}, "min": min, "max": max, "TESTED": tested})
    return types.SimpleNamespace(TESTED=tested, CI_SUBSET=subset)


capabilities = _version_table()

MATRIX_DIR = ROOT / ".matrix"
RESULTS_DIR = ROOT / "docs" / "matrix"
BASE_PACKAGES = [
    "numpy", "safetensors", "accelerate", "wrapt", "pytest", "hypothesis", "psutil", "tqdm",
    "matplotlib", "packaging", "pyyaml", "regex", "requests", "filelock", "sentencepiece", "protobuf",
    "bitsandbytes==0.50.2",  # optional for users; the quantised-load tests need it
]
TESTS = ["tests/test_sweep.py", "tests/test_activation.py"]


def releases(args) -> list[str]:
    if args.versions:
        return args.versions
    table = capabilities.CI_SUBSET if args.fast else sorted(capabilities.TESTED)
    return [capabilities.TESTED[minor] for minor in table]


def _pip(python: Path, *what: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *what], check=True)


def _site_packages(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def build_base() -> Path:
    python = MATRIX_DIR / "base" / "bin" / "python"
    marker = MATRIX_DIR / "base" / ".complete"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MATRIX_DIR / "base")], check=True)
        _pip(python, "torch==2.13.0")  # first and alone, so nothing pulls a CUDA build
        _pip(python, *BASE_PACKAGES)
        marker.write_text("")
    return python


def build_env(release: str) -> Path:
    """A venv for one transformers release, layered over base; reinstalls this package."""
    base_python = build_base()
    env = MATRIX_DIR / f"tf-{release}"
    python = env / "bin" / "python"
    marker = env / ".complete"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        # After the venv's own site-packages on sys.path, so the overlay's pins win.
        Path(_site_packages(python), "_fasthug_matrix_base.pth").write_text(_site_packages(base_python) + "\n")
        _pip(python, f"transformers=={release}", *extra_pins(release))
        marker.write_text("")
    _pip(python, "--no-deps", "--force-reinstall", str(package_wheel()))
    return python


def extra_pins(release: str) -> list[str]:
    return [pin for prefix, pins in EXTRA_PINS.items() if release.startswith(prefix) for pin in pins]


_WHEEL: list[Path] = []


def package_wheel() -> Path:
    """This checkout built once per run, so environments install the same bytes (and two
    runs side by side do not race on the source tree's build directory)."""
    if not _WHEEL:
        out = MATRIX_DIR / "wheels" / str(os.getpid())
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                        "-w", str(out), str(ROOT)], check=True)
        _WHEEL.append(next(out.glob("fasthug_patch-*.whl")))
    return _WHEEL[0]


def run_env(release: str, pytest_args: list[str], results: Path, all_tests: bool) -> dict:
    python = build_env(release)
    results.mkdir(parents=True, exist_ok=True)
    record = results / f"{release}.json"
    junit = MATRIX_DIR / f"junit-{release}.xml"
    record.unlink(missing_ok=True)
    env = {**os.environ, "FASTHUG_MATRIX_RECORD": str(record)}
    env.pop("FASTHUG_ENABLE", None)
    started = time.time()
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
         *([] if all_tests else TESTS), *pytest_args],
        cwd=ROOT, env=env,
    )
    counts = _junit_counts(junit)
    data = json.loads(record.read_text()) if record.exists() else {"transformers": release, "architectures": {}}
    data.update(tests=counts, exit_code=proc.returncode, seconds=round(time.time() - started, 1))
    record.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def render() -> None:
    # the base environment has the package's dependencies; the checkout is on its path (cwd)
    subprocess.run([str(build_base()), "-m", "fasthug_patch.compat_doc"], cwd=ROOT, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "run", "render"])
    parser.add_argument("versions", nargs="*", help="transformers releases (default: every tested line)")
    parser.add_argument("--fast", action="store_true", help="only the CI subset")
    parser.add_argument("--all-tests", action="store_true", help="the whole test suite, not just sweep + activation")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the records go (default docs/matrix)")
    parser.add_argument("--pytest", default="", help="extra pytest arguments, as one string")
    args = parser.parse_intermixed_args(argv)
    pytest_args = shlex.split(args.pytest)
    if args.command == "render":
        render()
        return 0
    failed = []
    for release in releases(args):
        if args.command == "build":
            build_env(release)
            continue
        print(f"=== transformers {release}", flush=True)
        data = run_env(release, pytest_args, args.results, args.all_tests)
        if data["exit_code"] != 0:
            failed.append(release)
    if args.command == "run" and args.results.resolve() == RESULTS_DIR:
        render()
        if failed:
            print(f"matrix: failures on {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
