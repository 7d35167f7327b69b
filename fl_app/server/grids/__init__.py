"""Grids that wrap Flower's Grid under the strategy: byte metering (``metered.py``), progress
while a round waits (``progress.py``) and secure aggregation (``secure_aggregation.py``), all
on one delegating base (``base.py``)."""
