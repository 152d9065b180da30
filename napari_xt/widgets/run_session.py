"""One run of the run widget, on the main thread: worker, progress, grid, layers, errors.

Items from the worker are only queued when they arrive; a `QTimer` handles the queue and
pushes the changes to napari at most `REFRESH_HZ` times a second, so the event loop stays
free however fast regions finish. Handling is guarded against re-entry: napari's progress
bars and notifications spin the event loop (`processEvents`), so a handler can be called
again while it runs; the nested call returns at once and the outer one finishes the queue.

Garbage collection: with napari, torch and a large plan in memory a full (generation 2)
collection scans ~600k objects and pauses every thread for ~0.3 s, mid-stream. A run
therefore freezes the objects that exist when it starts and again once it is planned
(`gc.freeze`: collections skip them) and unfreezes them when the last running session
ends, so only objects made during the run are scanned while it streams. The freeze is the
run's own: when something else in the process had frozen objects before (another plugin,
napari itself), napari-xt neither freezes nor unfreezes anything (unfreezing would undo
theirs), and `NAPARI_XT_GC_FREEZE=0` turns it off.

Cancel sets the engine's cancel `Event`: the engine stops at the next region, writes what
is finished, reports `Cancelled` and the worker ends by itself (its generator is never
abandoned half-way, so the store is always resumable); a worker that does not end within
`QUIT_AFTER_S` of a cancel is also asked to quit.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .region_grid import (
    CONTEXTUALIZED,
    DECODED,
    ENCODED,
    FAILED,
    QUEUED,
    RegionGridPainter,
)
from .result_layers import LiveResults
from .run_job import (
    ModelLoaded,
    ResultTiles,
    RunRequest,
    preview_stride,
    run_events,
    run_outputs,
)
from .viewport import ViewportPriority

REFRESH_HZ = 10
MAX_INTERVAL_MS = 2000  # the refresh interval backs off up to this when redraws are slow
PROBE_MS = 25  # event-loop lateness probe period
LAG_HIGH_MS, LAG_LOW_MS = 15.0, 4.0  # mean probe lateness that stretches / shrinks refreshes
QUIT_AFTER_S = 10.0
CREATE_GAP_MS = 30  # between two result layers created at the start of a run
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_FROZEN = [0]  # running sessions that froze the garbage collector (napari-xt's own freeze)


def _gc_freeze(first: bool) -> bool:
    """Freeze the objects that exist now (see the module docstring); `first`: a session
    starts. Returns whether this session holds a freeze (to pass to `_gc_thaw`)."""
    import gc
    import os

    if os.environ.get("NAPARI_XT_GC_FREEZE", "1").strip() == "0":
        return False
    if _FROZEN[0] == 0 and gc.get_freeze_count() > 0:
        return False  # someone else's freeze: leave the collector as it is
    gc.freeze()
    _FROZEN[0] += int(first)
    return True


def _gc_thaw() -> None:
    import gc

    _FROZEN[0] = max(0, _FROZEN[0] - 1)
    if _FROZEN[0] == 0:
        gc.unfreeze()


def last_session(viewer) -> RunSession | None:
    """The most recent run started in `viewer` (for the inspection widget)."""
    ref = _LAST.get(viewer)
    return ref


class RunSession:
    """Drives one run; `outcome` becomes "finished", "cancelled" or "failed"."""

    def __init__(self, viewer, request: RunRequest, on_done: Callable[[RunSession], None],
                 on_status: Callable[[str], None] | None = None) -> None:
        self.viewer = viewer
        self.request = request
        self.on_done = on_done
        self.on_status = on_status or (lambda text: None)
        self.cancel_event = threading.Event()
        self.outcome: str | None = None
        self.model = None
        self.model_description = ""
        self.normalize = None
        self.planned = None
        self.summary: dict[str, Any] = {}
        self.store = request.store
        self.counts: Counter = Counter()
        self.painter: RegionGridPainter | None = None
        self.results: LiveResults | None = None
        self.priority: ViewportPriority | None = None
        self.progress = None
        self.worker = None
        self.failed_regions = 0
        self.decoded: set[tuple[int, int]] = set()  # regions decoded by this run
        self.context_steps: list[tuple[tuple[int, int], ...]] = []  # crops, in order
        self._progress_pending = 0
        self._timer = None
        self._quit_timer = None
        self._interval = 1000 // REFRESH_HZ
        self._last_text = 0.0
        self._probe = None
        self._probe_last = 0.0
        self._lag = 0.0
        self._queue: deque = deque()
        self._busy = False
        self._worker_ended = False
        self._frozen = False
        _LAST[viewer] = self

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from qtpy.QtCore import QTimer

        from .models import keep_triton_out
        from .workers import start_worker

        keep_triton_out()  # before the worker imports torch
        shape = _yx_shape(self.request)
        if self.request.order == "viewport":
            self.priority = ViewportPriority(self.viewer, self.request.scale,
                                             self.request.translate, shape)
        self.worker = start_worker(run_events, self.request, self.cancel_event, self.priority)
        self.worker.yielded.connect(self._queue.append)
        self.worker.errored.connect(lambda err: self._queue.append(_WorkerError(err)))
        self.worker.finished.connect(self._on_worker_finished)
        self._timer = QTimer()
        self._timer.setInterval(1000 // REFRESH_HZ)
        self._timer.timeout.connect(self.pump)
        self._timer.start()
        self._probe = QTimer()
        self._probe.setInterval(PROBE_MS)
        self._probe.timeout.connect(self._on_probe)
        self._probe.start()
        self.on_status("loading the model…")
        self._frozen = _gc_freeze(first=True)
        self.worker.start()

    def cancel(self) -> None:
        from qtpy.QtCore import QTimer

        self.cancel_event.set()
        if self._quit_timer is None and self.worker is not None:
            self._quit_timer = QTimer()
            self._quit_timer.setSingleShot(True)
            self._quit_timer.timeout.connect(self.worker.quit)
            self._quit_timer.start(int(QUIT_AFTER_S * 1000))

    @property
    def done(self) -> bool:
        return self.outcome is not None and self.worker is None

    def normalization(self):
        """Per-channel (mean, std) the engine applied to the pixels (None: raw pixels)."""
        return self.normalize

    def region_states(self) -> np.ndarray:
        """(rows, cols) uint8 region status recorded in the store (`engine.store` DONE,
        FAILED, PENDING)."""
        from napari_xt.engine.store import open_result

        return open_result(self.store).region_status()

    # ------------------------------------------------------------------ events
    def _on_worker_finished(self) -> None:
        from qtpy.QtCore import QTimer

        self._worker_ended = True
        QTimer.singleShot(0, self.pump)

    def pump(self) -> None:
        """Handle queued items, draw, and close the run once the worker has ended."""
        if self._busy or self.done:
            return
        self._busy = True
        try:
            while self._queue:
                self._on_item(self._queue.popleft())
            self._draw()
            if self._worker_ended and not self._queue:
                self._close()
        finally:
            self._busy = False

    def _on_item(self, item: Any) -> None:
        from napari_xt.engine import events as ev

        self.counts[type(item).__name__] += 1
        if isinstance(item, _WorkerError):
            from .workers import describe

            self._fail(describe(item.error))
        elif isinstance(item, ResultTiles):
            if self.results is not None:
                self.results.add(item)
            if self.painter is not None:
                self.painter.mark(item.indices, DECODED)
        elif isinstance(item, ModelLoaded):
            self.model, self.model_description = item.model, item.description
            self.normalize = item.normalize
            self.on_status(f"model: {item.description}")
        elif isinstance(item, ev.Planned):
            self._on_planned(item)
        elif isinstance(item, ev.RegionEncoded):
            self._mark(item.indices, ENCODED)
        elif isinstance(item, ev.ContextStep):
            self.context_steps.append(tuple(item.regions))
            self._mark(item.regions, CONTEXTUALIZED)
        elif isinstance(item, (ev.RegionDecoded, ev.Written)):
            self._mark(item.indices, DECODED)
            if isinstance(item, ev.RegionDecoded):
                self.decoded.update(tuple(i) for i in item.indices)
            if isinstance(item, ev.Written):
                self._progress_pending += len(item.indices)
        elif isinstance(item, ev.RegionFailed):
            self._mark(item.indices, FAILED)
            self.failed_regions += len(item.indices)
        elif isinstance(item, ev.Notice):
            self._on_notice(item)
        elif isinstance(item, ev.Finished):
            self.outcome, self.summary = "finished", dict(item.summary)
            self.store = item.store or self.store
        elif isinstance(item, ev.Cancelled):
            self.outcome = "cancelled"
        elif isinstance(item, ev.Failed):
            self._fail(item.message.strip().splitlines()[0] if item.message.strip() else
                       "unknown error")

    def _mark(self, indices, state: int) -> None:
        if self.painter is not None:
            self.painter.mark(indices, state)

    def _on_planned(self, plan) -> None:
        from napari.utils import progress

        self.planned = plan
        self.store = plan.store or self.store
        if self._frozen:
            _gc_freeze(first=False)  # the plan's objects too
        rows, cols = plan.grid
        h, w = plan.image_shape
        self.painter = RegionGridPainter(self.viewer, rows, cols, plan.region_size,
                                         self.request.scale, self.request.translate,
                                         auto_flush=False, image_shape=(h, w))
        self.painter.mark_all(QUEUED)
        head = getattr(getattr(self.model, "cfg", None), "head", None)
        self.results = LiveResults(self.viewer, self.request.name, h, w, preview_stride(h, w),
                                   self.request.scale, self.request.translate,
                                   table_scale=self.request.table_scale, tag=self.request.tag,
                                   store=self.store,
                                   class_names=getattr(head, "class_names", ()) or (),
                                   point_names=getattr(head, "point_names", ()) or ())
        if self.model is not None:  # create the result layers now, not mid-stream
            head = self.model.cfg.head
            self.results.expect(run_outputs(self.model, self.request.probabilities),
                                int(getattr(head, "num_classes", 0) or 0))
        self.progress = progress(total=max(1, plan.todo_regions), desc="xT regions")
        resumed = f", resuming ({plan.total_regions - plan.todo_regions} done)" if plan.resumed \
            else ""
        self.on_status(f"{rows} x {cols} regions of {plan.region_size} px, {plan.crops} crops, "
                       f"{plan.order} order{resumed}")

    def _on_notice(self, notice) -> None:
        from napari.utils.notifications import show_warning

        self.on_status(notice.message)
        if notice.kind in ("warning", "oom", "nan"):
            show_warning(f"Run xT: {notice.message}")

    def _fail(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.outcome = "failed"
        show_error(f"Run xT failed: {message}")
        self.on_status(f"failed: {message}")

    # ------------------------------------------------------------------ drawing
    def _on_probe(self) -> None:
        """A 25 ms timer measuring how late the event loop runs (redraws included: under
        software OpenGL one canvas redraw takes tens of ms). While it runs late the refresh
        interval stretches (up to `MAX_INTERVAL_MS`); when it is on time it shrinks back
        towards 1 / `REFRESH_HZ`."""
        import time

        now = time.perf_counter()
        if self._probe_last:
            lag = max(0.0, (now - self._probe_last) * 1000 - PROBE_MS)
            self._lag = 0.8 * self._lag + 0.2 * lag
            base = 1000 // REFRESH_HZ
            if self._lag > LAG_HIGH_MS:
                target = min(MAX_INTERVAL_MS, int(self._interval * 1.25) + 1)
            elif self._lag < LAG_LOW_MS:
                target = max(base, int(self._interval * 0.95))
            else:
                target = self._interval
            if target != self._interval and self._timer is not None:
                self._interval = target
                self._timer.setInterval(target)
        self._probe_last = now

    def _draw(self) -> None:
        """Push recorded progress to napari (main thread)."""
        import time

        t0 = time.perf_counter()
        if self.painter is not None:
            self.painter.flush()
        if self.results is not None:
            self.results.flush()
            if self.results.creating:  # the run's layers, one per turn of the event loop,
                from qtpy.QtCore import QTimer  # before regions stream in

                QTimer.singleShot(CREATE_GAP_MS, self.pump)
        # napari's progress bar spins the event loop on every update: once a second at most
        if self.progress is not None and self._progress_pending and t0 - self._last_text > 1.0:
            n, self._progress_pending = self._progress_pending, 0
            self._last_text = t0
            self.on_status(f"{self.progress.n + n} / {self.progress.total} regions written")
            self.progress.update(n)

    def _close(self) -> None:
        from napari.utils.notifications import show_error, show_warning

        for timer in (self._timer, self._quit_timer, self._probe):
            if timer is not None:
                timer.stop()
        if self.outcome is None:  # worker quit or ended without a final event
            self.outcome = "cancelled" if self.cancel_event.is_set() else "failed"
        self.worker = None
        if self._frozen:
            self._frozen = False
            _gc_thaw()
        try:
            if self.outcome == "finished" and self.results is not None:
                self.results.finish(self.store)
        except Exception as err:  # keep the previews; they match the written regions
            show_error(f"Run xT: results written to {self.store} but not shown: {err}")
        if self.painter is not None:
            self.painter.stop(self.outcome)
        if self.progress is not None:
            if self._progress_pending:
                self.progress.update(self._progress_pending)
                self._progress_pending = 0
            self.progress.close()
        if self.priority is not None:
            self.priority.disconnect()
        if self.failed_regions:
            show_warning(f"Run xT: {self.failed_regions} region(s) failed; see the red "
                         "regions of the grid layer")
        if self.outcome == "finished":
            label = self.results.describe_classification() if self.results else None
            shown = f": {label} over {self.results.classification.get('crops', 1)} crop(s)" \
                if label else ""
            self.on_status(f"finished{shown}; results in {self.store}")
        elif self.outcome == "cancelled":
            self.on_status(f"cancelled; finished regions kept in {self.store} (Run resumes)")
        self.on_done(self)


class _WorkerError:
    """An exception raised in the worker, queued like the events."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _yx_shape(request: RunRequest) -> tuple[int, int]:
    shape = tuple(int(n) for n in request.image.shape)
    iy, ix = request.axes.index("Y"), request.axes.index("X")
    return shape[iy], shape[ix]
