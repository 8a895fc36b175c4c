"""LoadReport: what one from_pretrained call did, and why."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

LOGGER_NAME = "transformers.fasthug_patch"  # under transformers' root: its verbosity applies

_last_lock = threading.Lock()
_last: LoadReport | None = None


@dataclass
class LoadReport:
    model_class: str
    source: str
    path: str = "stock"  # "fast", "fallback", or "stock" (patch not enabled for the call)
    reason: str = ""
    bytes: int = 0
    seconds: float = 0.0
    tensors_mapped: int = 0
    tensors_cast: int = 0
    tensors_copied: int = 0  # read into fresh memory in their own dtype (FASTHUG_IO=direct)
    tensors_to_device: int = 0  # streamed through the pinned ring (device_map on a GPU)
    bytes_filled: int = 0  # read from the checkpoint files by this process's parallel reads
    ranks: str = ""  # in a multi-process job: how the ranks shared the reading, or why not
    threads: int = 0
    files: list[str] = field(default_factory=list)
    io: dict[str, str] = field(default_factory=dict)  # file -> how it was read, and why
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @contextmanager
    def phase(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - began

    def summary(self) -> str:
        head = f"fasthug_patch: {self.model_class} from {self.source}: {self.path}"
        if self.reason:
            head += f" ({self.reason})"
        if self.path == "fast":
            phases = ", ".join(f"{k} {v:.3f}s" for k, v in self.phases.items())
            head += (
                f"; {self.bytes / 1e9:.2f} GB in {self.seconds:.3f}s ({self.gb_per_s:.2f} GB/s), "
                f"{self.tensors_mapped} mapped, {self.tensors_cast} cast, "
                + (f"{self.tensors_copied} copied, " if self.tensors_copied else "")
                + f"{self.tensors_to_device} to device, "
                f"{self.threads} threads; {phases}"
            )
            reads = sorted(set(self.io.values()))
            if reads:
                head += "; files: " + "; ".join(reads)
            if self.ranks:
                head += f"; ranks: {self.ranks}"
            if self.notes:
                head += "; " + "; ".join(self.notes)
        return head


def publish(report: LoadReport) -> None:
    global _last
    with _last_lock:
        _last = report
    import logging

    logging.getLogger(LOGGER_NAME).info(report.summary())


def last_report() -> LoadReport | None:
    """The report of the most recent from_pretrained call that went through the patch."""
    return _last
