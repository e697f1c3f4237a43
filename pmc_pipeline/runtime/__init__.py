"""The driver's runtime: the Ray session, placement, checkpoints, outputs that never overwrite."""
