"""Subcommands of the ``napari-xt`` command line, one module each (see napari_xt.cli)."""
