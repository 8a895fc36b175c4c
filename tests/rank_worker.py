"""One rank of tests/test_torchrun.py: load a checkpoint through the patch, write what it got.

argv: checkpoint directory, output directory, "env" (torchrun's variables only) or "gloo"
(a gloo process group initialised first).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    checkpoint, out, mode = sys.argv[1:4]
    if mode == "gloo":
        import torch.distributed as dist

        dist.init_process_group("gloo")
    import transformers

    import fasthug_patch
    from tests.tiny import model_digest

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    report = fasthug_patch.last_report()
    rank = int(os.environ["RANK"])
    result = {"rank": rank, "digest": model_digest(model), "path": report.path, "reason": report.reason,
              "ranks": report.ranks, "bytes_filled": report.bytes_filled, "env_store": os.environ.get(
                  "TORCHELASTIC_USE_AGENT_STORE")}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    if mode == "gloo":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
