"""UI responsiveness while the "Run xT" widget streams a 16k x 16k scene on the CPU.

A napari viewer (on a virtual X display when there is no screen) shows the lazily generated
16384 x 16384 SAR-like sample scene (chunks of `--chunk` px); the run widget processes its
full-resolution level in its worker thread, viewport-first, while the camera moves every
`--pan-every` seconds (re-prioritisation, redraws). A `QTimer` heartbeat fires every 10 ms
on the main thread; a stall is how much later than planned a beat arrives.

Three modes are measured in the same viewer, one after the other, so the widget's share is
visible: `idle` (the viewer alone), `engine` (the same run consumed by a plain thread: no
widget, no layers; what the computation costs the UI through the interpreter lock) and
`widget` (the Run xT widget: worker, region grid, live layers; cancelled after
`--seconds`, the cancel included). Goal: no stall over 100 ms.

    python benchmarks/ui_responsiveness.py [--seconds 40] [--modes idle,engine,widget]

Prints per mode the max and p99 stall and their ratio to the 100 ms goal. Not a unit test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

GOAL_MS = 100.0
# "streaming" starts when the first finished regions reach the UI (after the model loaded,
# the run was planned and its layers were created); the start-up before it is reported apart
BEAT_MS = 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="measured time per mode (the widget run is cancelled after it)")
    parser.add_argument("--size", type=int, default=16384, help="scene side in pixels")
    parser.add_argument("--model", default=None, help="model choice (default: demo model)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=256, help="scene chunk size in pixels")
    parser.add_argument("--no-pan", action="store_true", help="keep the camera still")
    parser.add_argument("--pan-every", type=float, default=10.0,
                        help="seconds between camera moves (viewport re-prioritisation)")
    parser.add_argument("--modes", default="idle,engine,widget",
                        help="comma list of: idle (viewer only), engine (engine in a plain "
                             "thread, no widget), widget (the Run xT widget)")
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_XT_CONFIG_DIR", tempfile.mkdtemp(prefix="xt-bench-cfg-"))
    from napari_xt.widgets.snapshot import virtual_display

    with virtual_display() as display:
        if display is None and sys.platform.startswith("linux"):
            print("no display and no Xvfb: cannot run a napari viewer", file=sys.stderr)
            return 1
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_xt._napari_io import image_layers
    from napari_xt.sample_data import sar_scene
    from napari_xt.widgets.models import DEMO_MODEL
    from napari_xt.widgets.run_widget import RunWidget

    viewer = napari.Viewer(show=True)
    image = sar_scene(args.size, args.size, seed=0, chunk=args.chunk)
    for data, kwargs, _ in image_layers(image, "SAR"):
        viewer.add_image(data, **kwargs)
    viewer.reset_view()  # the whole scene in view: napari shows a coarse pyramid level
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Run xT", area="right")
    widget.select_image(next(widget.image_combo.itemText(i)
                             for i in range(widget.image_combo.count())
                             if "channels" in widget.image_combo.itemText(i)))
    widget.model_combo.setCurrentText(args.model or DEMO_MODEL)
    widget.order_combo.setCurrentText("viewport-first")
    widget.device_combo.setCurrentText("cpu")
    widget.batch_spin.setValue(args.batch_size)
    widget.resume_check.setChecked(False)
    app = QApplication.instance()
    settle(app, 0.5)
    rows = []
    for mode in args.modes.split(","):
        widget.store_edit.setText(os.path.join(tempfile.mkdtemp(prefix="xt-bench-"), "run.zarr"))
        gaps, info = heartbeat_during(app, viewer, widget, mode, args)
        rows.append((mode, gaps, info))
        report(mode, gaps, info)
        settle(app, 1.0)
    print("\nsummary (stall = heartbeat delay beyond its 10 ms period; goal: <= 100 ms)")
    print(f"{'mode':<8} {'max ms':>8} {'p99 ms':>8} {'max/goal':>9} {'p99/goal':>9} "
          f"{'stream max':>10} {'ratio':>6} {'stream p99':>10}")
    for mode, gaps, info in rows:
        stalls = np.clip(gaps - BEAT_MS, 0, None)
        worst, p99 = float(stalls.max(initial=0.0)), float(np.percentile(stalls, 99))
        stream = np.clip(info["streaming"] - BEAT_MS, 0, None)
        later = float(stream.max(initial=0.0))
        later99 = float(np.percentile(stream, 99)) if len(stream) else 0.0
        print(f"{mode:<8} {worst:8.1f} {p99:8.1f} {worst / GOAL_MS:9.2f} {p99 / GOAL_MS:9.2f} "
              f"{later:10.1f} {later / GOAL_MS:6.2f} {later99:10.1f}")
    viewer.close()
    return 0


def settle(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def heartbeat_during(app, viewer, widget, mode: str, args) -> tuple[np.ndarray, dict]:
    """Heartbeat gaps (ms) while `mode` runs for `args.seconds`: "idle" (viewer only),
    "engine" (the same engine run in a plain thread, no widget, no layers) or "widget"."""
    import threading

    from qtpy.QtCore import QElapsedTimer, QTimer

    from napari_xt.widgets.viewport import camera_of

    clock, beats = QElapsedTimer(), []
    heartbeat = QTimer()
    heartbeat.setInterval(BEAT_MS)
    heartbeat.timeout.connect(lambda: beats.append(clock.elapsed()))
    camera = camera_of(viewer)
    rng = np.random.default_rng(0)
    world = np.asarray(viewer.layers[0].scale[-2:], float)
    mover = QTimer()
    mover.setInterval(int(args.pan_every * 1000))
    mover.timeout.connect(lambda: setattr(camera, "center", (
        *camera.center[:-2], *(rng.uniform(0.25, 0.75, 2) * args.size * world))))
    info: dict = {"firsts": {}, "stream_start_s": 0.0}
    clock.start()
    heartbeat.start()
    t0 = time.perf_counter()
    if not args.no_pan:
        mover.start()
    if mode == "idle":
        settle(app, args.seconds)
    elif mode == "engine":
        stop = threading.Event()
        request = widget.request()
        info["t0"] = t0
        thread = threading.Thread(target=engine_only, args=(request, stop, info), daemon=True)
        thread.start()
        settle(app, args.seconds)
        stop.set()
        while thread.is_alive():
            settle(app, 0.05)
    else:
        session = widget.start()
        session.worker.yielded.connect(lambda item: info["firsts"].setdefault(
            type(item).__name__, time.perf_counter() - t0))
        cancelled_at = None
        while widget.running:
            settle(app, 0.01)
            if cancelled_at is None and time.perf_counter() - t0 > args.seconds:
                cancelled_at = time.perf_counter()
                widget.cancel()
        info["cancel_s"] = time.perf_counter() - cancelled_at if cancelled_at else None
        info["written"] = session.progress.n if session.progress is not None else 0
        info["outcome"] = session.outcome
    heartbeat.stop()
    mover.stop()
    info["seconds"] = time.perf_counter() - t0
    beats_ms = np.asarray(beats, dtype=float)
    gaps = np.diff(beats_ms)
    info["worst"] = sorted(((float(g), float(beats_ms[i] / 1000)) for i, g in enumerate(gaps)),
                           reverse=True)[:5]
    if mode == "widget":
        info["stream_start_s"] = info["firsts"].get("ResultTiles", info["seconds"])
    info["streaming"] = gaps[beats_ms[:-1] > info["stream_start_s"] * 1000]
    return gaps, info


def engine_only(request, stop, info: dict) -> None:
    """The widget's worker generator, consumed in a plain thread (no Qt, no layers)."""
    from napari_xt.engine.events import Written
    from napari_xt.widgets.run_job import run_events

    written = 0
    for item in run_events(request, stop):
        if isinstance(item, Written):
            if not written:
                info["stream_start_s"] = time.perf_counter() - info["t0"]
            written += len(item.indices)
    info["written"] = written


def report(mode: str, gaps_ms: np.ndarray, info: dict) -> None:
    stalls = np.clip(gaps_ms - BEAT_MS, 0, None)
    worst, p99 = float(stalls.max(initial=0.0)), float(np.percentile(stalls, 99))
    print(f"\n[{mode}] {info['seconds']:.1f} s, {len(gaps_ms) + 1} beats of {BEAT_MS} ms")
    if "written" in info:
        print(f"  regions written: {info['written']}" + (
            f", outcome {info['outcome']}" if "outcome" in info else ""))
    if info.get("cancel_s") is not None:
        print(f"  cancel to clean state: {info['cancel_s']:.2f} s")
    if info["firsts"]:
        print("  first events (s): " + ", ".join(
            f"{k} {v:.1f}" for k, v in info["firsts"].items()))
    print("  worst gaps (ms at s): " + ", ".join(f"{g:.0f} at {t:.1f}" for g, t in info["worst"]))
    print(f"  max stall {worst:.1f} ms ({worst / GOAL_MS:.2f} x the {GOAL_MS:.0f} ms goal)")
    print(f"  p99 stall {p99:.1f} ms ({p99 / GOAL_MS:.2f} x the {GOAL_MS:.0f} ms goal)")
    later = np.clip(info["streaming"] - BEAT_MS, 0, None)
    print(f"  streaming (from {info['stream_start_s']:.1f} s, the first regions shown): max "
          f"{float(later.max(initial=0.0)):.1f} ms, "
          f"p99 {float(np.percentile(later, 99)) if len(later) else 0.0:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
