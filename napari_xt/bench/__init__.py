"""Benchmarks behind `napari-xt bench` (scaling with image size; the engine and store's own
share of a run). They sit on top of the package, like the commands; `benchmarks/` holds the
scripts and the measured results."""
