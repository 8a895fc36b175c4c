"""Tensors read ahead of a consumer that takes them one at a time, within a byte budget.

Stock 5.x materialises weights on demand, one at a time, while it quantises on the fly:
with a GPU target, reading ahead without bound would put the full-precision model on the
GPU before the quantizer had shrunk any of it. Here each request is queued in the order
the loader made it and handed back as a Request; taking one (its ``result()``) submits it
(if it was not yet) and keeps the requests after it submitted while their bytes, together
with those already submitted and not yet taken, fit the budget. So the engine reads ahead at its
full parallelism, and at most ``budget`` bytes (plus the one being taken) wait on the
device. One consumer thread (the loader's); a request taken out of order is submitted on
the spot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# How far full-precision weights may be read (and cast) ahead of a quantizer that takes them
# one at a time: enough for the next weights' reads and casts to run while one is quantised,
# little beside the model (bytes on the weights' device).
QUANTISE_AHEAD_BYTES = 256 << 20


@dataclass(eq=False)
class Request:
    """A queued request; ``result()`` takes it (submitting it first if it was not yet)."""

    owner: "Lookahead"
    nbytes: int
    submit: Callable  # () -> Future
    future: object = None
    taken: bool = False

    def result(self):
        return self.owner._take(self)


class Lookahead:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._requests: list[Request] = []
        self._next = 0  # the first request not yet submitted in order
        self._ahead = 0  # bytes submitted and not yet taken
        self.most_ahead = 0  # the high-water mark of _ahead (tests, report)

    def add(self, nbytes: int, submit: Callable) -> Request:
        """Queue a request; its ``result()`` takes it."""
        request = Request(self, nbytes, submit)
        self._requests.append(request)
        return request

    def _take(self, request: Request):
        if request.future is None:
            self._submit(request)
        self._top_up()
        try:
            return request.future.result()
        finally:
            request.future, request.taken = None, True  # the consumer holds the tensor now, not us
            self._ahead -= request.nbytes
            self._top_up()

    def _top_up(self) -> None:
        while self._next < len(self._requests):
            request = self._requests[self._next]
            if request.future is None and not request.taken:
                if self._ahead and self._ahead + request.nbytes > self.budget:
                    return  # the first is always let through, however large
                self._submit(request)
            self._next += 1

    def _submit(self, request: Request) -> None:
        request.future = request.submit()
        self._ahead += request.nbytes
        self.most_ahead = max(self.most_ahead, self._ahead)
