"""Scale-out on dask.distributed (`pip install "napari-xt[distributed]"`).

- Many images (`images.py`): `predict_many(images, model, out_dir, workers=N)`, one
  ordinary engine run per image, N images at a time in worker processes.
- One image over many workers (`image.py`; `schedule.py` the blocks, `worker.py` the
  worker side): `run_distributed(image, model, store, workers=N)`, the image's blocks
  encoded, contextualized and decoded in parallel, the results written into one store by
  this process; bit-identical to a single-process run.

Both run on a local cluster of N processes started for the call, or on a running cluster
(`scheduler="tcp://host:8786"`; every worker needs napari-xt, the model file and the
images at the same paths). Each worker process loads the model once (`cluster.py`).
"""

from .image import run_distributed
from .images import ImageOutcome, output_stores, predict_image, predict_many, store_name
from .schedule import block_grid
from .worker import run_part

__all__ = [
    "ImageOutcome",
    "block_grid",
    "output_stores",
    "predict_image",
    "predict_many",
    "run_distributed",
    "run_part",
    "store_name",
]
