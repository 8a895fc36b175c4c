"""State of one from_pretrained call on the fast path, visible to the adapter's internals.

The from_pretrained wrapper opens a LoadCall; the wrapped internals find it through a
context variable, so concurrent loads in other threads each see their own (or none).
"""

from __future__ import annotations

import contextlib
import contextvars
import time

from fasthug_patch import settings
from fasthug_patch.engine import Materializer
from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import CheckpointIndex
from fasthug_patch.report import LoadReport

_current: contextvars.ContextVar[LoadCall | None] = contextvars.ContextVar("fasthug_load_call", default=None)
# Set for every from_pretrained call the patch routes (fast or declined to stock), so the
# adapter refuses weight files outside the checkpoint directory on both paths.
_guarding_paths: contextvars.ContextVar[bool] = contextvars.ContextVar("fasthug_guard_paths", default=False)


class LoadCall:
    def __init__(self, report: LoadReport) -> None:
        self.report = report
        self.checkpoint_files: list[str] | None = None
        self.index = CheckpointIndex()
        self.entered_fast_internals = False
        self.fast_loads = 0
        self.stock_loads: list[str] = []  # reasons internals went stock
        self._materializer: Materializer | None = None
        self.device_map = None  # as given to from_pretrained
        self.max_memory = None  # as given to from_pretrained
        self.casting = False  # a dtype was asked for
        self.dtype_asked = None  # what was asked for (a torch.dtype, "auto", a string, or None)
        self.quantizing = False  # bitsandbytes quantises weights as they load
        self.quantize_lookahead = None  # GPU reads ahead of the quantizer (lookahead.Lookahead), made on first use
        self.model_class = None  # the class whose from_pretrained was called

    @property
    def materializer(self) -> Materializer:
        if self._materializer is None:
            self._materializer = Materializer(
                settings.reader_threads(), settings.chunk_bytes(), settings.populate_mapped(), settings.io_mode()
            )
        return self._materializer

    def prefetch(self, files) -> None:
        """Start reading the cold safetensors files now, while stock builds the model.
        Never raises: this runs inside stock code, before the fast internals; a problem
        shows up again, and is handled, when the weights are materialised."""
        names = [str(f) for f in files or () if str(f).endswith(".safetensors")]
        if not names:
            return
        try:
            from fasthug_patch import ranks

            peers, why = ranks.peer_group()
            if peers is None and why != ranks.NOT_A_JOB:
                self.materializer.sharing = f"not shared: {why}"
            self.materializer.prepare(names, peers)
            if self.device_map is not None:
                from fasthug_patch.engine import ring

                gpus = ring.cuda_devices(self.device_map)
                casts = self._casts_floats(names)
                if self.materializer.may_stage(casts):
                    ring.warm_async(gpus)  # pin the GPU staging ring while stock builds the model
                if len(gpus) == 1 and not casts:
                    self.materializer.pin_ahead(next(iter(gpus)))  # and the page-cached files' pages
        except Exception as exc:  # noqa: BLE001
            self.report.notes.append(f"prefetch skipped: {exc}")

    def _casts_floats(self, files) -> bool:
        """Whether the dtype asked for differs from some floating-point tensor's in ``files``
        (then those tensors go through the staging ring, not the pinned files)."""
        asked = self.dtype_asked
        if not self.casting or not hasattr(asked, "is_floating_point"):
            return self.casting  # nothing asked for, or a string: not known before stock resolves it
        return any(ref.torch_dtype().is_floating_point and ref.torch_dtype() != asked
                   for ref in self.index.tensors(files).values())

    def cast_ahead(self, dtype, config) -> None:
        """Stock has settled the dtype the model is built in (``dtype``) and is about to
        build it: start the casts it will most likely ask for, then map the pages of the
        tensors it will most likely take as they are (cast_ahead.py). Never
        raises, like prefetch: whatever goes wrong here is met again, and handled, when the
        loader asks for the tensors."""
        if self._materializer is None or not self.checkpoint_files or not settings.cast_ahead():
            return
        try:
            from fasthug_patch import cast_ahead

            files = [str(f) for f in self.checkpoint_files]
            if not all(f.endswith(".safetensors") for f in files):
                return
            tensors = self.index.tensors(files)
            device_map = cast_ahead.resolve_device_map(self.device_map, self.max_memory, tensors, dtype)
            refs = cast_ahead.guess(tensors, dtype, device_map, config, self.model_class)
            if refs:
                self.materializer.cast_ahead(refs, dtype)
            views = cast_ahead.views(tensors, dtype, device_map, config, self.model_class)
            if views:
                self.materializer.map_ahead(views)  # queued behind the casts: they are waited for first
        except Exception as exc:  # noqa: BLE001
            self.report.notes.append(f"cast ahead skipped: {exc}")

    def change_seen(self) -> str | None:
        """Why a checkpoint file whose header was read is no longer as it was, if it is not."""
        try:
            self.index.check_unchanged()
        except CheckpointError as exc:
            return str(exc)
        return None

    def declined(self, reason: str) -> None:
        if self._materializer is not None:
            self._materializer.drop_ahead()  # stock's internals load these weights instead
        if reason not in self.stock_loads:
            self.stock_loads.append(reason)

    def close(self, failed: bool) -> None:
        engine, self._materializer = self._materializer, None
        if engine is None:
            return
        began = time.perf_counter()
        engine.close(cancel=failed)
        report = self.report
        report.phases["drain"] = time.perf_counter() - began
        report.bytes += engine.bytes_read
        report.tensors_mapped += engine.tensors_mapped
        report.tensors_cast += engine.tensors_cast
        report.tensors_copied += engine.tensors_copied
        report.tensors_to_device += engine.tensors_to_device
        report.threads = engine.threads
        report.io.update(engine.io)
        report.bytes_filled += engine.bytes_filled
        report.ranks = engine.sharing or report.ranks
        report.notes.extend(engine.notes)
        report.phases["reader_busy"] = engine.busy_seconds

    def __enter__(self) -> LoadCall:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._token)


def current() -> LoadCall | None:
    return _current.get()


@contextlib.contextmanager
def guarding_paths():
    token = _guarding_paths.set(True)
    try:
        yield
    finally:
        _guarding_paths.reset(token)


def paths_guarded() -> bool:
    return _guarding_paths.get()
