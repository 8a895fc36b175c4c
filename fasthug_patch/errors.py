"""Exceptions the plugin raises or uses to steer control flow."""

from __future__ import annotations


class FastPathError(RuntimeError):
    """Something inside the fast path went wrong; the load is redone by stock."""


class CheckpointError(FastPathError, ValueError):
    """A checkpoint file is malformed or unreadable. Names the file and the tensor."""

    def __init__(self, file: str, tensor: str | None, problem: str) -> None:
        self.file = file
        self.tensor = tensor
        self.problem = problem
        where = f"{file}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {problem}")


class Unsupported(FastPathError):
    """The fast path does not handle this case; the stock code handles it instead."""


class CheckpointPathError(ValueError, FileNotFoundError):
    """A checkpoint names a weight file outside its own directory (``../x.safetensors`` or an
    absolute path in index.json's weight_map). Stock transformers joins such names onto the
    directory and reads whatever is there; the plugin refuses, and never retries with stock.

    A ValueError, as stock's own refusal of a ``transformers_weights`` path escaping the
    directory is; and a FileNotFoundError, as stock's error is when that outside file does not
    exist. Not a FastPathError: falling back to stock would read the file."""

    def __init__(self, file: str, problem: str) -> None:
        self.file = file
        self.problem = problem
        super().__init__(f"{file}: {problem}")


class DistributedLoadError(RuntimeError):
    """Another rank of a multi-process job failed, or timed out, reading its part of a
    checkpoint this rank shares (ranks.py). Raised on every rank that waits for it, and
    never answered with a stock retry: the job's ranks must fail together, not go on with
    different weights or wait forever."""
