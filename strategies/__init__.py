"""Server-side aggregation: Flower strategies chosen by name, metric rules, metering, tracking.

Nothing here imports transformers or PEFT: the server sees arrays and metrics.
"""
