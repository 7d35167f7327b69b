"""The one schema of the product's settings, with the one set of defaults.

``task.py`` (what a hospital receives), ``strategy.py`` (aggregation, client-level DP),
``tracking.py`` (MLflow), ``run.py`` (a whole run, registered in Hydra's ConfigStore),
``compose.py`` (Hydra composes ``conf/`` presets over the schema), ``checks.py``.
Imports nothing else of the product, so every package may use it.
"""
