"""docs/images/sieve_compare.png: whole-image context | the same + sieve 64 | truth, on the
window of a held-out 2048 px coast scene where the model's labels differ most from the
truth (pixels shown 2x), with the sea/lake IoU of the whole scene in each caption line.

    python scripts/docs_sieve_figure.py [--seed-offset 0] [--window 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_xt.commands.demo import compare_png, sea_lake_iou
from napari_xt.engine import Finished, run
from napari_xt.io import sieve
from napari_xt.model.choice import load_model
from napari_xt.train.demo import HELD_OUT_SEED
from napari_xt.train.synthetic import SceneConfig, SyntheticScene

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "sieve_compare.png"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed-offset", type=int, default=0, help="which held-out scene")
    p.add_argument("--window", type=int, default=256, help="window side in px")
    p.add_argument("--min-size", type=int, default=64)
    args = p.parse_args()
    scene = SyntheticScene(HELD_OUT_SEED + 700_000 + args.seed_offset,
                           SceneConfig(height=2048, width=2048))
    image, truth = scene.read()
    model, _, norm = load_model("demo-image")
    fin = list(run(image, model, None, cache=False, device="cpu", axes="CYX",
                   normalize=norm, outputs=("labels",)))[-1]
    assert isinstance(fin, Finished), fin
    labels = np.asarray(fin.summary["arrays"]["labels"])
    sieved = sieve(labels, args.min_size)
    # the window with the most wrong water pixels (model against truth)
    n = args.window
    wrong = ((labels != truth) & (truth != 0)).astype(np.int64)
    cum = np.pad(wrong.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = cum[n:, n:] - cum[:-n, n:] - cum[n:, :-n] + cum[:-n, :-n]
    y, x = np.unravel_index(int(np.argmax(sums[::16, ::16])), sums[::16, ::16].shape)
    y, x = 16 * y, 16 * x
    window = (slice(y, y + n), slice(x, x + n))

    def big(a):
        return np.repeat(np.repeat(a[window], 2, axis=0), 2, axis=1)

    compare_png(OUT, big(image[0])[None], [(big(labels), "model"), (big(sieved), "sieved"),
                                          (big(truth), "truth")])
    print(f"{OUT}: rows {y}:{y + n}, columns {x}:{x + n}; sea/lake IoU of the scene: model "
          f"{100 * sea_lake_iou(labels, truth):.1f}, + sieve {args.min_size} "
          f"{100 * sea_lake_iou(sieved, truth):.1f}")


if __name__ == "__main__":
    main()
