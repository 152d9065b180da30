"""``napari-xt predict IMAGE --model NAME|CKPT --out OUT.zarr``: stream a model over an image.

Writes an OME-Zarr 0.5 store (labels, probabilities, detections table or classification
record, with provenance). Interrupt with Ctrl-C: finished regions are kept, and the same
command again resumes ("resuming: ..."). Exit codes: 0 done, 1 the run failed, 2 bad input,
130 cancelled.

Many images: ``napari-xt predict A B C ... --out-dir DIR [--workers N]`` writes
``DIR/<name>.xt.zarr`` per image, N images at a time in worker processes (dask.distributed;
``--scheduler ADDRESS`` uses an existing cluster). An image that fails is reported and the
others go on; exit code 1 if any failed.

One image over many workers: ``napari-xt predict IMAGE --out OUT.zarr --workers N`` (or
``--scheduler ADDRESS``, ``--devices cuda:0,cuda:1``) splits the image into blocks that the
workers encode, contextualize and decode in parallel; this process writes the store, the
results are those of a single-process run (`napari_xt.distributed.image`).

How the image is read: ``--axes`` (a bare array's axes), ``--plane z=0,t=3`` (extra axes),
``--series N`` (a TIFF holding several image series is refused without it). What the model
assumes about pixel values is said before the run; values that clearly do not match its
training data (an integer image for a model trained on dB, say) are refused unless
``--accept-range``. A run that cannot fit in memory or on disk is refused before anything
is written, and a run of many regions says its estimate first; ``--batch-size`` is capped
to the memory there is.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from napari_xt.commands.inputs import add_image_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="run a model over an image of any size",
                              description=__doc__)
    p.add_argument("image", nargs="+", help="input image(s): OME-Zarr, TIFF/SVS, zarr, npy")
    p.add_argument("--model", required=True,
                   help="'demo' (the built-in model), a zoo model name (untrained weights "
                        "from seed 0, or those of --weights) or a checkpoint file")
    p.add_argument("--weights", default=None,
                   help="weights for the zoo --model: an official xT checkpoint (.pth/.ckpt, "
                        "read with torch.load(weights_only=True)) or a napari-xt "
                        ".safetensors file of that architecture")
    add_image_options(p)
    p.add_argument("--accept-range", action="store_true",
                   help="run on pixel values that do not look like the model's training "
                        "data (they are never rescaled)")
    p.add_argument("--out", default=None,
                   help="output store of one image (a directory ending in .zarr)")
    p.add_argument("--out-dir", default=None,
                   help="folder for the stores of many images (<name>.xt.zarr each)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (needs dask.distributed): with --out-dir, images "
                        "run at once; with --out, the blocks of the one image")
    p.add_argument("--scheduler", default=None,
                   help="address of a running dask.distributed scheduler to run on")
    p.add_argument("--devices", default=None,
                   help="one device per local worker, e.g. cuda:0,cuda:1 (one image over "
                        "several GPUs; --workers defaults to their number)")
    p.add_argument("--block", type=int, default=None,
                   help="regions a side of a block of one image over workers (default: a "
                        "store shard, smaller when that leaves workers idle)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--batch-size", type=int, default=8,
                   help="regions per encoder batch (capped to the memory there is)")
    p.add_argument("--order", choices=("raster", "zigzag", "viewport"), default="raster")
    p.add_argument("--level", type=int, default=0, help="pyramid level to predict on")
    p.add_argument("--outputs", default=None,
                   help="comma list of labels, probabilities, detections, classification")
    p.add_argument("--crop-stride", type=int, default=None, help="regions between crops")
    p.add_argument("--blend", choices=("tokens", "outputs"), default="tokens",
                   help="merge overlapping crops by their context tokens (each region "
                        "decoded once, default) or by their decoded outputs (3-4x slower)")
    p.add_argument("--context", choices=("crop", "image"), default=None,
                   help="what each region sees: 'crop' (the crops that cover it) or 'image' "
                        "(a summary of the whole image, read by every crop; models trained "
                        "for it). Default: the mode the model was trained for")
    p.add_argument("--threshold", type=float, default=0.5, help="detection score threshold")
    p.add_argument("--sieve", type=int, default=None, metavar="N",
                   help="when the run is finished, also write labels/prediction_sieveN: its "
                        "labels with every piece under N px relabelled to what surrounds it "
                        "(as napari-xt sieve does; 64 suits the built-in models)")
    p.add_argument("--no-cache", action="store_true", help="do not keep region embeddings")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="replace an embedding cache made for another image or model")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of a different run in OUT (only a napari-xt "
                        "result store is ever replaced, and only what napari-xt wrote)")
    p.add_argument("--restart", action="store_true", help="do not resume; start again")
    p.add_argument("--on-error", choices=("stop", "continue"), default="stop",
                   help="what an unreadable region does to the run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often fastest on a busy shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command)


class Progress:
    """One-line text progress bar on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.total, self.start, self.last = quiet, 0, time.perf_counter(), 0.0
        self.done0 = 0

    def planned(self, todo: int, total: int) -> None:
        self.total, self.done0 = total, total - todo

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if (self.quiet or (now - self.last < 0.2 and not force) or not self.total
                or self.done0 == self.total):
            return
        self.last = now
        rate = (done - self.done0) / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * done / self.total)
        print(f"\r[{bar:<30}] {done}/{self.total} regions  {rate:.1f}/s  ETA {left:.0f} s ",
              end="", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        if not self.quiet and self.last:
            print(file=sys.stderr)
            self.last = 0.0
        print(text, file=sys.stderr, flush=True)


def run_command(args: argparse.Namespace) -> int:
    from napari_xt.cli import EXIT_USAGE

    if args.sieve is not None and args.sieve < 2:
        print(f"napari-xt predict: --sieve takes the smallest piece size to keep (2 px or "
              f"more, e.g. --sieve 64), not {args.sieve}", file=sys.stderr)
        return EXIT_USAGE
    for option, value in (("--threads", args.threads), ("--workers", args.workers)):
        if value is not None and value < 1:
            print(f"napari-xt predict: {option} must be at least 1, not {value}",
                  file=sys.stderr)
            return EXIT_USAGE
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    args.devices = devices or None
    if devices and args.workers == 1:
        args.workers = len(devices)
    split = args.workers > 1 or args.scheduler or args.devices
    if args.out and len(args.image) == 1 and split:
        if args.weights is not None:
            print("napari-xt predict: --weights with several workers: every worker loads "
                  "the model by itself, so give it as a napari-xt checkpoint (--model "
                  "FILE.safetensors)", file=sys.stderr)
            return EXIT_USAGE
        args.image = args.image[0]
        return run_one(args)
    if args.devices or args.block is not None:
        print("napari-xt predict: --devices and --block split one image (--out) over "
              "workers", file=sys.stderr)
        return EXIT_USAGE
    if args.out_dir or len(args.image) > 1 or args.workers > 1 or args.scheduler:
        given = [f"--{k.replace('_', '-')}" for k in ("axes", "plane", "series", "weights")
                 if getattr(args, k) is not None]
        if given:
            print(f"napari-xt predict: {', '.join(given)} apply to one image (--out); "
                  "predict such images one at a time", file=sys.stderr)
            return EXIT_USAGE
        if not args.out_dir:
            print("napari-xt predict: several images (or --workers, --scheduler) need "
                  "--out-dir; --out names the store of a single image", file=sys.stderr)
            return EXIT_USAGE
        if args.out:
            print("napari-xt predict: give --out for one image or --out-dir for many, not "
                  "both", file=sys.stderr)
            return EXIT_USAGE
        return run_many(args)
    if not args.out:
        print("napari-xt predict: give the output store with --out", file=sys.stderr)
        return EXIT_USAGE
    args.image = args.image[0]
    return run_one(args)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine `run` arguments the command line sets (all but image, model, store)."""
    from napari_xt.engine.spelling import CLI

    outputs = tuple(o.strip() for o in args.outputs.split(",")) if args.outputs else None
    return dict(spelling=CLI, device=args.device, batch_size=args.batch_size, order=args.order,
                level=args.level, cache=False if args.no_cache else
                ("rebuild" if args.rebuild_cache else True), overwrite=args.overwrite,
                resume=not args.restart, on_error=args.on_error, outputs=outputs,
                crop_stride=args.crop_stride, blend=args.blend, threshold=args.threshold,
                context=args.context)


def _refused_values(args: argparse.Namespace, model, normalize) -> set[str]:
    """The images whose pixel values do not look like the model's training data (unless
    --accept-range), each said in one line; they are left out, the others run."""
    from napari_xt.cli import bad_input_line, is_bad_input
    from napari_xt.io.source import ImageSource
    from napari_xt.io.value_range import check_value_range

    refused = set()
    for image in args.image:
        try:
            source = ImageSource(image, level=args.level)
        except Exception:  # an image that cannot be read fails in its own run, said there
            continue
        if source.channels != model.cfg.in_chans:  # (its run names the mismatch)
            continue
        try:
            check_value_range(source, normalize, accept=args.accept_range, where=image)
        except Exception as err:
            if not is_bad_input(err):
                raise
            refused.add(image)
            print(bad_input_line("predict", err) + " (left out; the others run)",
                  file=sys.stderr)
    return refused


def run_many(args: argparse.Namespace) -> int:
    from napari_xt.cli import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from napari_xt.distributed import predict_many

    missing = [i for i in args.image if not os.path.exists(i)]
    if missing:
        print(f"napari-xt predict: no such image(s): {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:  # a model that cannot load is bad input for every image: say it once
        from napari_xt.distributed.cluster import model_for as _model

        model, normalize = _model(args.model)[:2]  # also kept for the images run here
    except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"napari-xt predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    refused = _refused_values(args, model, normalize)  # what one image would refuse
    args.image = [i for i in args.image if i not in refused]
    if not args.image:
        return EXIT_USAGE
    cancel = threading.Event()
    counts: dict[str, int] = {}
    total = len(args.image)
    start = time.perf_counter()
    restore = cancel_on_ctrl_c(cancel)
    outcomes = None
    try:
        outcomes = predict_many(args.image, args.model, args.out_dir, workers=args.workers,
                                threads=args.threads, scheduler=args.scheduler, cancel=cancel,
                                **engine_options(args))
        for n, o in enumerate(outcomes, 1):
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
            detail = (f"{o.regions} regions, {o.encoded} encoded" if o.outcome == "finished"
                      else o.message)
            print(f"[{n}/{total}] {o.outcome:<9} {o.image} -> {o.store} ({o.seconds:.1f} s; "
                  f"{detail})", flush=True)
            if o.outcome == "finished" and args.sieve and _has_labels(o.store):
                from napari_xt.cli import bad_input_line, is_bad_input
                from napari_xt.commands.sieve import sieve_after_run

                try:
                    print(f"[{n}/{total}] {o.store}: " + sieve_after_run(
                        o.store, "prediction", args.sieve, overwrite=args.overwrite),
                        flush=True)
                except Exception as err:  # a sieved copy it must not replace: say so, go on
                    if not is_bad_input(err):
                        raise
                    print(bad_input_line("predict", err), file=sys.stderr, flush=True)
                    refused.add(o.image)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the stores keep finished regions
        cancel.set()
        print("cancelled; finished regions are kept, run the same command again to resume",
              file=sys.stderr)
        return EXIT_CANCELLED
    except (ValueError, ImportError, OSError) as err:  # OSError: no scheduler there
        print(f"napari-xt predict: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if outcomes is not None:
            outcomes.close()  # stops a cluster's remaining work and closes the cluster
        restore()
    if cancel.is_set():
        print("cancelled; finished regions are kept, run the same command again to resume",
              file=sys.stderr)
    print(f"{counts.get('finished', 0)} of {total} images finished in "
          f"{time.perf_counter() - start:.1f} s" + "".join(
              f", {v} {k}" for k, v in counts.items() if k != "finished"), flush=True)
    if counts.get("failed"):
        return EXIT_FAILED
    if counts.get("cancelled") or counts.get("skipped"):
        return EXIT_CANCELLED
    return EXIT_USAGE if refused else EXIT_OK  # (the images left out were bad input)


def _has_labels(store: str) -> bool:
    from napari_xt.io import list_results

    return "prediction" in list_results(store)["labels"]


def run_one(args: argparse.Namespace) -> int:
    """One image into one store. Everything that can refuse the run (the image read as
    asked, the model, its value range, the engine's checks) does before anything is written;
    the package's bad-input errors end in `cli.main` with one line, exit code 2."""
    from napari_xt.cli import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, bad_input_line
    from napari_xt.commands.inputs import image_request, load_cli_model
    from napari_xt.engine import events as ev
    from napari_xt.engine import run
    from napari_xt.io.source import ImageSource
    from napari_xt.io.value_range import check_value_range

    cancel = threading.Event()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    image = image_request(args.image, args)
    # only what names bad input is caught here (the package's own bad-input errors end in
    # cli.main); anything else is a failure of the work, with its traceback
    try:
        source = ImageSource(image, level=args.level)  # its checks of the image as asked
    except ValueError as err:  # (a level that is not there, an unreadable layout, ...)
        print(bad_input_line("predict", err), file=sys.stderr)
        return EXIT_USAGE
    try:
        model, _, normalize = load_cli_model(args.model, args.weights, source.channels)
    except (KeyError, FileNotFoundError) as err:  # an unknown name, a missing file
        print(bad_input_line("predict", err), file=sys.stderr)
        return EXIT_USAGE
    options = engine_options(args)
    values = None
    if source.channels == model.cfg.in_chans:  # (else the engine names the mismatch)
        values = check_value_range(source, normalize, accept=args.accept_range,
                                   where=args.image)
    if args.workers > 1 or args.scheduler or args.devices:  # one image over workers
        from napari_xt.distributed import run_distributed

        try:
            events = run_distributed(image, args.model, args.out, workers=args.workers,
                                     scheduler=args.scheduler, threads=args.threads,
                                     devices=args.devices, block=args.block, cancel=cancel,
                                     in_chans=source.channels, **options)
        except (ImportError, ConnectionError) as err:  # no dask.distributed, no scheduler
            print(f"napari-xt predict: {err}", file=sys.stderr)
            return EXIT_USAGE
    else:
        events = run(image, model, args.out, normalize=normalize, cancel=cancel, **options)
    if values and not args.quiet:  # what is assumed about the values, once the run is on
        print(values, file=sys.stderr, flush=True)

    bar = Progress(args.quiet)
    code = EXIT_FAILED
    restore = cancel_on_ctrl_c(cancel)
    try:
        for e in events:
            if isinstance(e, ev.Planned):
                bar.planned(e.todo_regions, e.total_regions)
                bar.line(f"{e.total_regions} regions ({e.grid[0]} x {e.grid[1]} of "
                         f"{e.region_size} px), {e.crops} crops of up to {e.crop_regions} x "
                         f"{e.crop_regions}, order {e.order}")
            elif isinstance(e, ev.Notice):
                bar.line(e.message)
            elif isinstance(e, ev.RegionFailed):
                bar.line(f"region {e.indices} failed: {e.reason}")
            elif isinstance(e, ev.Written):
                bar.update(e.done)
            elif isinstance(e, ev.Finished):
                bar.update(bar.total, force=True)
                done = ", ".join(str(v) for k, v in e.summary.items()
                                 if k in ("labels", "probabilities", "table"))
                bar.line(f"wrote {e.store} ({done or 'classification'}) in {e.seconds:.1f} s: "
                         f"{e.counts.get('encoded', 0)} regions encoded, "
                         f"{e.counts.get('from_cache', 0)} from cache, "
                         f"{e.counts.get('failed', 0)} failed")
                if "classification" in e.summary:
                    rec = e.summary["classification"]
                    print(f"class {rec['class']} (score {rec['score']:.3f})")
                code = EXIT_OK if e.summary.get("complete", True) else EXIT_FAILED
                if code == EXIT_OK and "labels" in e.summary:
                    from napari_xt.commands.sieve import sieve_after_run, stale_copies

                    name = str(e.summary["labels"]).rsplit("/", 1)[-1]
                    if args.sieve:
                        bar.line(sieve_after_run(e.store, name, args.sieve,
                                                 overwrite=args.overwrite))
                    for stale, size in stale_copies(e.store, name):
                        bar.line(f"note: labels/{stale} was sieved from earlier labels of "
                                 f"this store; napari-xt sieve {e.store} --min-size {size} "
                                 f"--out-name {stale} --overwrite renews it")
            elif isinstance(e, ev.Failed):
                bar.line(f"napari-xt predict: failed: {e.message}")
                code = EXIT_FAILED
            elif isinstance(e, ev.Cancelled):
                bar.line(f"cancelled after {e.done_regions}/{e.total_regions} regions; "
                         "run the same command again to resume")
                code = EXIT_CANCELLED
    finally:
        restore()
    return code


def cancel_on_ctrl_c(cancel: threading.Event):
    """The first Ctrl-C sets `cancel` (the work stops at the next region, finished work is
    kept); a second one interrupts at once. Returns the function that restores the old
    handler (nothing happens off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        cancel.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    return lambda: signal.signal(signal.SIGINT, previous)
