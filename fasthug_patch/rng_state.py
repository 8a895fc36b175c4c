"""Random number generator states, put back before stock redoes a failed fast attempt.

A fast attempt that fails part-way may already have drawn random numbers: 4.57
initialises the missing weights (a new classification head, say) before it loads the
others. Redone from there, stock's random weights, and every later draw of the program,
would differ from a plain stock call made with the same seed. So the states the call began
with are restored first: torch's CPU generator, CUDA's where it was already initialised,
and Python's and NumPy's global generators (cheap, and a program's own later draws depend
on them).
"""

from __future__ import annotations

import random
import sys


class Snapshot:
    __slots__ = ("_torch", "_cuda", "_python", "_numpy")

    def __init__(self) -> None:
        import torch

        self._torch = torch.get_rng_state()
        # Not initialised yet: left alone (reading its state would start CUDA).
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._python = random.getstate()
        numpy = sys.modules.get("numpy")
        self._numpy = numpy.random.get_state() if numpy is not None else None

    def restore(self) -> None:
        import torch

        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        random.setstate(self._python)
        if self._numpy is not None:
            sys.modules["numpy"].random.set_state(self._numpy)


def snapshot() -> Snapshot:
    return Snapshot()
