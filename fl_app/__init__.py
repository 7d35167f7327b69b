"""The Flower apps and entry points: wiring between Flower, ``tasks`` and ``strategies``."""
