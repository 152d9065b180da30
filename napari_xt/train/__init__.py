"""Training: synthetic tasks, datasets over zarr pairs, losses, metrics, the training loop,
checkpoints with exact resume, and the shipped demo model (`demo.load_demo_model`)."""
