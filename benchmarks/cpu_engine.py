"""CPU benchmark of the streaming engine: seconds per megapixel and peak RSS vs image size,
with ratios against the smallest size and against a naive whole-image forward measured in
the same run. Same as `napari-xt bench scaling`; the code lives in `napari_xt.bench.scaling`.

Run: python benchmarks/cpu_engine.py [--sizes 4096,8192,16384,32768] [--naive-max 4096]
     [--threads 1] [--json out.json]
"""

import sys

from napari_xt.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
