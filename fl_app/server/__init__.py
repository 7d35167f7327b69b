"""The coordinator's side: the ServerApp, the checks before round 1, resume and checkpoints,
the Grids the strategy's messages go through. Imports nothing of ``fl_app/hospital/``."""
