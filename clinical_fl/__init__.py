"""The product's own packages under one name, so that installing it puts no generic names
(``settings``, ``serving`` ...) at the top of site-packages.

``settings/`` the typed schema and defaults; ``protocol/`` what server and hospitals say to each
other; ``tracking/`` MLflow; ``secure_aggregation/`` the cryptography; ``serving/`` the
prediction service. The Flower apps (``fl_app/``), the strategies (``strategies/``) and the
machine-learning tasks (``tasks/``) stay at the top level, as the design keeps them.
"""
