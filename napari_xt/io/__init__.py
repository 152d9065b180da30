"""Image input/output: open any supported image lazily, build pyramids, convert to OME-Zarr,
write and read results (labels, detection tables, classification records), sieve label
images.

This package never imports Qt or napari.
"""

from .box import Box
from .convert import convert, iter_convert
from .errors import ImageIOError
from .image import MultiscaleImage
from .open import ImagePath, from_arrays, open_image
from .progress import ProgressCallback, ProgressEvent
from .pyramid import build_pyramid, downsample, pyramid_shapes
from .results import (
    LabelsResult,
    ProbabilitiesResult,
    list_results,
    read_classification,
    read_detections,
    read_labels,
    read_probabilities,
    write_classification,
    write_detections,
    write_labels,
)
from .sieve import sieve, sieve_lazy
from .stats import ImageStats, check_finite, contrast_limits, image_stats

__all__ = [
    "Box",
    "ImageIOError",
    "ImagePath",
    "ImageStats",
    "LabelsResult",
    "ProbabilitiesResult",
    "MultiscaleImage",
    "ProgressCallback",
    "ProgressEvent",
    "build_pyramid",
    "check_finite",
    "contrast_limits",
    "convert",
    "downsample",
    "from_arrays",
    "image_stats",
    "iter_convert",
    "list_results",
    "open_image",
    "pyramid_shapes",
    "read_classification",
    "read_detections",
    "read_labels",
    "read_probabilities",
    "sieve",
    "sieve_lazy",
    "write_classification",
    "write_detections",
    "write_labels",
]
