"""napari dock widgets: "Run xT" (`RunWidget`) and "Inspect context" (`InspectWidget`).

Thin shells over `napari_xt.engine`: the engine runs in a napari thread worker, its events
come back to the main thread, and only the main thread touches layers. Importing this
package imports Qt; the modules import napari and torch only where they are used.
"""
