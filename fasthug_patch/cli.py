"""``fasthug-patch``: benchmark, demo, explain and env.

    fasthug-patch bench MODEL_OR_PATH [-n 5] [--warmup 1] [--cold] [--dtype bf16] [--json F] [--plot F]
    fasthug-patch demo
    fasthug-patch explain MODEL_OR_PATH [--device-map cpu] [--dtype bf16]
    fasthug-patch env

torch and transformers are imported only inside the subcommands that need them (bench
and demo import neither here: the trials run in fresh processes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

DTYPE_CHOICES = ("default", "auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasthug-patch", description="fasthug_patch: faster from_pretrained, "
                                "same model bit for bit.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{bench,demo,explain,env}")

    b = sub.add_parser("bench", help="stock vs patched from_pretrained, fresh process per trial, ABBA order")
    b.add_argument("model", metavar="MODEL_OR_PATH")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each trial")
    b.add_argument("--cuda-first", action="store_true",
                   help="GPU trials create their CUDA context before the timer (its time is reported apart)")
    b.add_argument("--dtype", choices=DTYPE_CHOICES, default="default",
                   help="dtype passed to from_pretrained; 'default' passes none (fp32 on 4.x, auto on 5.x)")
    b.add_argument("--inference-mode", action="store_true",
                   help="load inside torch.inference_mode(), as serving code does")
    b.add_argument("-n", type=int, default=5, help="measured rounds (each runs every mode once)")
    b.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    b.add_argument("--json", metavar="FILE", help="write the full result (every trial) as JSON")
    b.add_argument("--plot", metavar="FILE", help="bar chart of the medians (needs matplotlib)")
    q = b.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit quantization_config")
    q.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4) quantization_config")
    b.add_argument("--no-forward", dest="forward", action="store_false",
                   help="skip the first forward pass (timed by default, its logits compared)")
    b.add_argument("--forward", dest="forward", action="store_true", help=argparse.SUPPRESS)  # the old opt-in
    b.set_defaults(forward=True)
    b.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="skip measuring memory / page-cache / disk bandwidth ceilings")
    b.add_argument("--modes", default="stock,patched", help=argparse.SUPPRESS)
    b.add_argument("--python", default=sys.executable, help="interpreter for the trials (default: this one)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("demo", help="build (once) a ~1.1B Llama checkpoint and benchmark stock vs patched on it")

    e = sub.add_parser("explain", help="which path from_pretrained would take, and why (loads no weights)")
    e.add_argument("model", metavar="MODEL_OR_PATH")
    e.add_argument("--device-map", default=None)
    e.add_argument("--dtype", choices=DTYPE_CHOICES, default="default")

    sub.add_parser("env", help="versions, what the capability table makes of them, the machine, and every "
                   "setting's value (paste it into a bug report)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "demo":
        return _demo()
    if args.command == "explain":
        return _explain(args)
    if args.command == "env":
        from fasthug_patch import env_report

        print("\n".join(env_report.lines()))
        return 0
    return 2  # pragma: no cover


# --------------------------------------------------------------------------- bench


def _bitsandbytes_available(python: str) -> bool:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return importlib.util.find_spec("bitsandbytes") is not None
    return subprocess.run([python, "-c", "import bitsandbytes"], capture_output=True).returncode == 0


def _bench(args) -> int:
    from fasthug_patch.bench import runner

    quant = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None
    if quant and not _bitsandbytes_available(args.python):
        print(f"fasthug-patch bench: --load-in-{quant} needs bitsandbytes, which is not installed for "
              f"{args.python} (pip install 'fasthug_patch[bnb]').", file=sys.stderr)
        return 2
    if args.n < 1 or args.warmup < 0:
        print("fasthug-patch bench: -n must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    modes = tuple(m for m in args.modes.split(",") if m)
    try:
        result = runner.run_bench(args.model, modes=modes, n=args.n, warmup=args.warmup, cold=args.cold,
                                  dtype=args.dtype, python=args.python, progress=not args.quiet,
                                  device=args.device, forward=args.forward, quant=quant,
                                  ceilings=args.ceilings, cuda_first=args.cuda_first,
                                  inference_mode=args.inference_mode)
    except (runner.TrialError, ValueError) as exc:
        print(f"fasthug-patch bench: {exc}", file=sys.stderr)
        return 1
    print(runner.format_table(result))
    _write_outputs(result, args.json, args.plot)
    return 0 if result["identical"] else 1


def _write_outputs(result: dict, json_file: str | None, plot_file: str | None) -> None:
    if json_file:
        with open(json_file, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)
        print(f"\nwrote {json_file}")
    if plot_file:
        if importlib.util.find_spec("matplotlib") is None:
            print(f"\nmatplotlib is not installed: skipping --plot {plot_file} (pip install matplotlib)")
        else:
            from fasthug_patch.bench import runner

            runner.plot(result, plot_file)
            print(f"wrote {plot_file}")


# --------------------------------------------------------------------------- demo


def _demo() -> int:
    from fasthug_patch.bench import checkpoints, runner

    path = checkpoints.demo_checkpoint()
    print(f"checkpoint: {path}")
    try:
        result = runner.run_bench(path, n=3, warmup=1, dtype="default", progress=True)
    except runner.TrialError as exc:
        print(f"fasthug-patch demo: {exc}", file=sys.stderr)
        return 1
    print()
    print(runner.format_table(result))
    print()
    r = result["ratio"]
    parts = []
    for key, label in (("from_pretrained_s", "from_pretrained"), ("ready_s", "time to ready")):
        if r.get(key):
            parts.append(f"{label} {r[key]:.2f}x faster" if r[key] >= 1 else f"{label} {1 / r[key]:.2f}x slower")
    print("patched vs stock: " + ", ".join(parts))
    print(f"weights identical: {'yes' if result['identical'] else 'no'}")
    return 0 if result["identical"] else 1


# --------------------------------------------------------------------------- explain


def _explain(args) -> int:
    import dataclasses

    import transformers

    import fasthug_patch

    kwargs = {}
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
    if args.dtype != "default":
        from fasthug_patch.bench.trial import dtype_kwargs

        kwargs.update(dtype_kwargs(args.dtype, transformers.__version__))
    try:
        exp = fasthug_patch.explain(args.model, **kwargs)
    except (OSError, ValueError) as exc:
        print(f"fasthug-patch explain: {exc}", file=sys.stderr)
        return 1
    print(exp)
    if exp.rule:
        print(f"  rule: {exp.rule}")
    facts = exp.facts
    defaults = type(facts)()
    shown = {f.name: getattr(facts, f.name) for f in dataclasses.fields(facts)
             if getattr(facts, f.name) != getattr(defaults, f.name)}
    for name, value in shown.items():
        if isinstance(value, frozenset):
            value = ", ".join(sorted(value)) or "-"
        print(f"  {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
