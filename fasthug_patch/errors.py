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
