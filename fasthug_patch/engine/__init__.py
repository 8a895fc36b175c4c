"""The I/O engine: checkpoint bytes -> final tensors (see materialize.Materializer)."""

from fasthug_patch.engine.materialize import Materializer

__all__ = ["Materializer"]
