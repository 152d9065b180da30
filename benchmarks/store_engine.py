"""How much of a run is the engine and its result store, not the model: a run into a store,
in memory, the model's own compute and the engine's compute-free ceiling, in one process.
Same as `napari-xt bench store`; the code lives in `napari_xt.bench.store`.

Run: python benchmarks/store_engine.py [--size 4096] [--threads 2] [--json out.json]
"""

import sys

from napari_xt.bench.store import main

if __name__ == "__main__":
    sys.exit(main())
