"""Build the sdist and the wheel, install the wheel into fresh virtual environments and run
the command line there, as a user who runs `pip install napari-xt` gets it.

Jobs (all of them by default, in this order):

  build   sdist from the checkout, then the wheel from the unpacked sdist (so the sdist is
          proven to be complete)
  latest  fresh venv: the pinned torch from constraints/dev.txt, then the wheel without
          extras (newest versions of everything else)
  lowest  the same with every core dependency held at the lower bound pyproject.toml
          declares (a constraints file generated from it; torch stays at the pin)

Each install job checks that no GUI package came with the wheel and that torch is the pin,
then runs `napari-xt --version`, `napari-xt demo --headless` (the built-in trained models,
whole-image then crop context: named in its output, and their labels agree with the
generated scene's truth) and
`napari-xt predict` on a generated scene saved as .npy and as a tiled, compressed TIFF
(exit code 0; the store opens with napari_xt.io and its labels agree with the truth), and
`napari-xt convert` on a JPEG-compressed Aperio SVS (the same pixels through napari_xt.io,
with a pyramid). The latest job then adds the `napari` extra: `npe2 validate napari-xt
--imports` and the headless demo rendered with napari on Xvfb.
Everything is written under --work (default build/wheel-smoke); a venv is removed after its
job passes unless --keep.

    python scripts/wheel_smoke.py [build|latest|lowest|all] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PIN_FILE = ROOT / "constraints" / "dev.txt"
SVS = ROOT / ".venv" / "test-data" / "CMU-1-Small-Region.svs"  # `make setup` fetches it
MARKER = ".wheel-smoke"  # marks a --work folder as made by this script
GUI_DISTRIBUTIONS = ("napari", "npe2", "magicgui", "qtpy", "superqt", "PyQt6", "PyQt5",
                     "PySide6", "vispy")
MIN_AGREEMENT = 0.9  # trained demo model vs the scene's truth; random weights give ~0.3
TIMINGS: list[tuple[str, float]] = []


class SmokeError(RuntimeError):
    pass


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    """name -> version pinned in constraints/dev.txt (torch, torchvision)."""
    out = {}
    for line in PIN_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def lower_bounds(dependencies: list[str]) -> dict[str, str]:
    """name -> lower bound of every core dependency; each must have exactly one `>=`."""
    out = {}
    for req in dependencies:
        match = REQUIREMENT.match(req.split(";", 1)[0])
        if match is None:
            raise SmokeError(f"cannot read the requirement {req!r}")
        name, _, spec = match.groups()
        bounds = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
        if len(bounds) != 1:
            raise SmokeError(f"dependency {req!r} needs one lower bound (>=) to be tested")
        out[name.lower().replace("_", "-")] = bounds[0]
    return out


def sh(cmd: list[str], *, cwd: Path | None = None, capture: bool = False,
       env: dict | None = None) -> subprocess.CompletedProcess:
    shown = ["<script>" if "\n" in str(c) else str(c) for c in cmd]
    print("+", " ".join(shown), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, text=True, env=env,
                          capture_output=capture)
    if capture:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SmokeError(f"exit code {proc.returncode}: {' '.join(shown)}")
    return proc


def timed(label: str):
    class Timer:
        def __enter__(self):
            self.t0 = time.perf_counter()
            print(f"\n== {label}", flush=True)

        def __exit__(self, *exc):
            seconds = time.perf_counter() - self.t0
            TIMINGS.append((label, seconds))
            print(f"== {label}: {seconds:.0f} s{' (failed)' if exc[0] else ''}", flush=True)

    return Timer()


def prepare_work(work: Path) -> None:
    if work.exists() and not (work / MARKER).is_file():
        raise SmokeError(f"{work} exists and was not made by this script; choose another "
                         "folder with --work")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by scripts/wheel_smoke.py; removed and remade by it\n")


def fresh_dir(path: Path) -> Path:
    """`path` empty; it lies inside the --work folder, which only this script writes."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------- build
def build(work: Path) -> Path:
    """sdist from the checkout, wheel from the unpacked sdist; returns the wheel."""
    dist = fresh_dir(work / "dist")
    with timed("build sdist and wheel (wheel from the sdist)"):
        sh([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", dist], cwd=ROOT)
        (sdist,) = dist.glob("napari_xt-*.tar.gz")
        unpacked = fresh_dir(work / "sdist")
        with tarfile.open(sdist) as tar:
            tar.extractall(unpacked, filter="data")
        (tree,) = unpacked.iterdir()
        sh([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", dist], cwd=tree)
        (wheel,) = dist.glob("napari_xt-*.whl")
    return wheel


# ------------------------------------------------------------------------------ install
def venv_python(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "python"


def install(job: str, wheel: Path, work: Path) -> Path:
    """A fresh venv holding the pinned torch and the wheel (no extras); returns the venv."""
    venv = work / f"venv-{job}"
    if venv.exists():
        shutil.rmtree(venv)
    py = venv_python(venv)
    pinned = pins()
    constraints = ["-c", PIN_FILE]
    if job == "lowest":
        lowest = work / "lowest-constraints.txt"
        bounds = lower_bounds(project()["dependencies"])
        lines = [f"{name}=={version}" for name, version in bounds.items()
                 if name not in pinned]
        lowest.write_text("# lower bounds declared in pyproject.toml (torch: the pin in "
                          "constraints/dev.txt)\n" + "\n".join(lines) + "\n")
        print(lowest.read_text())
        constraints += ["-c", lowest]
    with timed(f"{job}: venv with the pinned torch"):
        sh([sys.executable, "-m", "venv", venv])
        sh([py, "-m", "pip", "install", "-q", *constraints,
            *(f"{n}=={v}" for n, v in pinned.items())])
    with timed(f"{job}: install the wheel (no extras)"):
        sh([py, "-m", "pip", "install", "-q", *constraints, wheel])
        sh([py, "-m", "pip", "check"])
    installed = {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(
        sh([py, "-m", "pip", "list", "--format", "json"], capture=True).stdout)}
    (work / f"{job}-freeze.json").write_text(json.dumps(installed, indent=1, sort_keys=True))
    gui = [d for d in GUI_DISTRIBUTIONS if d.lower() in installed]
    if gui:
        raise SmokeError(f"{job}: the wheel without extras brought GUI packages: {gui}")
    for name, version in pinned.items():
        if installed.get(name) != version:
            raise SmokeError(f"{job}: {name} is {installed.get(name)}, not the pin {version}")
    if job == "lowest":
        bounds = lower_bounds(project()["dependencies"])
        off = {n: (installed.get(n), v) for n, v in bounds.items()
               if n not in pinned and not same_version(installed.get(n), v)}
        if off:
            raise SmokeError(f"lowest: not installed at the lower bound: {off}")
    print(f"{job}: " + ", ".join(f"{n} {installed[n]}" for n in sorted(
        lower_bounds(project()["dependencies"])) if n in installed))
    return venv


def same_version(installed: str | None, bound: str) -> bool:
    """'1.26.0' is the bound '1.26'; '2025.1.10' is not '2025.1' (pip chose a later one)."""
    if installed is None:
        return False
    a, b = installed.split("."), bound.split(".")
    return a[:len(b)] == b and all(p == "0" for p in a[len(b):])


# -------------------------------------------------------------------------------- smoke
CHECK = r"""
import sys
from pathlib import Path

import numpy as np

import napari_xt
from napari_xt.io import list_results, read_detections, read_labels
from napari_xt.train.synthetic import SceneConfig, make_scene

store, seed, size, venv, minimum = sys.argv[1:6]
if not Path(napari_xt.__file__).resolve().is_relative_to(Path(venv).resolve()):
    sys.exit(f"napari_xt imported from {napari_xt.__file__}, not from the venv")
results = list_results(store)
if not results["labels"] or not results["tables"]:
    sys.exit(f"{store}: expected labels and a detection table, found {results}")
labels = read_labels(store, results["labels"][0])
predicted = np.asarray(labels.levels[0])
_, truth, _ = make_scene(int(seed), SceneConfig(height=int(size), width=int(size)))
agreement = float((predicted == truth).mean())
points = read_detections(store, results["tables"][0])
print(f"{store}: labels {predicted.shape} agree with the truth on {agreement:.1%} of pixels; "
      f"{len(points['y'])} detections")
if agreement < float(minimum):
    sys.exit(f"labels agree with the truth on only {agreement:.1%} (trained model: > "
             f"{float(minimum):.0%})")
"""

SCENE = r"""
import sys

import numpy as np
import tifffile

from napari_xt.train.synthetic import SceneConfig, make_scene

seed, size, out = sys.argv[1:4]
image, _, _ = make_scene(int(seed), SceneConfig(height=int(size), width=int(size)))
image = np.asarray(image, np.float32)
np.save(f"{out}.npy", image)
# tiled and zstd-compressed: read through tifffile's zarr store and imagecodecs
tifffile.imwrite(f"{out}.tif", image, tile=(128, 128), compression="zstd",
                 metadata={"axes": "CYX"})
"""


SAME_PIXELS = r"""
import sys

import numpy as np

from napari_xt.io import open_image

src, dst = (open_image(p) for p in sys.argv[1:3])
# OME-Zarr stores channels first: compare in the source's axis order
a = np.asarray(src.levels[0])
b = np.moveaxis(np.asarray(dst.levels[0]), [dst.axes.index(ax) for ax in src.axes],
                range(len(src.axes))) if sorted(dst.axes) == sorted(src.axes) else None
if b is None or a.shape != b.shape or not np.array_equal(a, b) or len(dst.levels) < 2:
    sys.exit(f"{sys.argv[2]}: {dst.axes} {dst.levels[0].shape}, {len(dst.levels)} levels; "
             f"not {sys.argv[1]}'s {src.axes} {a.shape} pixels with a pyramid")
print(f"{sys.argv[2]}: the same {src.axes} {a.shape} pixels as the source ({dst.axes} in "
      f"the store), {len(dst.levels)} levels")
"""


def smoke(job: str, venv: Path, work: Path, svs: Path) -> None:
    py = venv_python(venv)
    cli = py.parent / "napari-xt"
    run = fresh_dir(work / f"run-{job}")  # outside the checkout: nothing imports the source
    with timed(f"{job}: napari-xt --version"):
        out = sh([cli, "--version"], cwd=run, capture=True).stdout.strip()
        if out != f"napari-xt {project()['version']}":
            raise SmokeError(f"napari-xt --version printed {out!r}")
    with timed(f"{job}: napari-xt demo --headless"):
        out = sh([cli, "demo", "--headless", "--out", "demo"], cwd=run, capture=True).stdout
        # the whole-image model on a 2048 px scene, then the crop model on the same scene
        for said in ("model: built-in model demo-image (image context)",
                     "model: built-in demo model (crop context)"):
            if said not in out:
                raise SmokeError(f"demo did not report {said!r}")
        for picture in ("demo.png", "compare.png"):
            if not (run / "demo" / picture).is_file():
                raise SmokeError(f"demo wrote no demo/{picture}")
        for store in ("demo.xt.zarr", "demo-crop.xt.zarr"):
            sh([py, "-c", CHECK, run / "demo" / store, 0, 2048, venv, MIN_AGREEMENT], cwd=run)
    sh([py, "-c", SCENE, 7, 256, run / "scene"], cwd=run)
    for suffix in (".npy", ".tif"):
        with timed(f"{job}: napari-xt predict on a {suffix} scene"):
            out = f"result{suffix.replace('.', '-')}.zarr"
            sh([cli, "predict", f"scene{suffix}", "--model", "demo", "--out", out, "--quiet"],
               cwd=run)
            sh([py, "-c", CHECK, run / out, 7, 256, venv, MIN_AGREEMENT], cwd=run)
    with timed(f"{job}: napari-xt convert a JPEG-compressed SVS"):
        sh([cli, "convert", svs, "slide.ome.zarr", "--quiet"], cwd=run)
        sh([py, "-c", SAME_PIXELS, svs, run / "slide.ome.zarr"], cwd=run)


def napari_extra(venv: Path, wheel: Path, work: Path) -> None:
    """The same venv plus the `napari` extra: the plugin's manifest and every command in it
    import, and the headless demo renders its screenshot with napari (on Xvfb)."""
    py = venv_python(venv)
    if shutil.which("Xvfb") is None:
        raise SmokeError("Xvfb is missing (bash scripts/ensure_display_deps.sh installs it)")
    with timed("latest: install the wheel with [napari]"):
        sh([py, "-m", "pip", "install", "-q", "-c", PIN_FILE, f"{wheel}[napari]"])
        sh([py, "-m", "pip", "check"])
    run = work / "run-latest"
    with timed("latest: npe2 validate napari-xt --imports"):
        out = sh([py.parent / "npe2", "validate", "napari-xt", "--imports"], cwd=run,
                 capture=True).stdout
        if "valid!" not in out:
            raise SmokeError("npe2 did not report the manifest valid")
    with timed("latest: napari-xt demo --headless --render napari"):
        out = sh([py.parent / "napari-xt", "demo", "--headless", "--render", "napari", "--out",
                  "demo-napari"], cwd=run, capture=True).stdout
        if "(napari on display" not in out or not (run / "demo-napari" / "demo.png").is_file():
            raise SmokeError("the demo did not render its screenshot with napari")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", default="all",
                        choices=("build", "latest", "lowest", "all"))
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "wheel-smoke",
                        help="folder for the builds, venvs and runs (made by this script)")
    parser.add_argument("--svs", type=Path, default=SVS,
                        help="an Aperio SVS file to convert (default: the one `make setup` "
                             "fetches)")
    parser.add_argument("--keep", action="store_true", help="keep the venvs after a pass")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if args.job != "build" and not args.svs.is_file():
        parser.error(f"no SVS file at {args.svs} (run `make setup`, or pass --svs)")
    t0 = time.perf_counter()
    try:
        prepare_work(work)
        wheel = build(work)
        for job in ("latest", "lowest"):
            if args.job in (job, "all"):
                venv = install(job, wheel, work)
                smoke(job, venv, work, args.svs.resolve())
                if job == "latest":
                    napari_extra(venv, wheel, work)
                if not args.keep:
                    with timed(f"{job}: remove the venv"):
                        shutil.rmtree(venv)
    except SmokeError as err:
        print(f"wheel smoke: {err}", file=sys.stderr)
        return 1
    finally:
        print("\ntimings:")
        for label, seconds in TIMINGS:
            print(f"  {seconds:6.0f} s  {label}")
        print(f"  {time.perf_counter() - t0:6.0f} s  total")
    print(f"wheel smoke ({args.job}): passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
