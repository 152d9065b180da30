"""napari-xt: xT nested tokenization for extremely large images, in napari.

An image of any size is split into regions; a region encoder turns each region into tokens;
a long-sequence context encoder (Transformer-XL, Hyper attention, Mamba) lets every token see
the others; heads decode classes, masks or points. See docs/architecture.md.

The core packages (io, model, engine, train) never import Qt or napari; torch is imported
lazily by the subpackages that need it, so `import napari_xt` stays cheap.
"""

__version__ = "0.1.0"
