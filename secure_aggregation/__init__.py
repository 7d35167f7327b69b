"""Secure aggregation: the server learns only the sum of the hospitals' updates.

Two modes (``settings/secure_aggregation.py``): SecAgg+ (``secagg_plus.py``: Flower's
protocol stages, ported to Message-API messages on Flower's own cryptographic helpers)
and CKKS homomorphic encryption (``ckks.py``, TenSEAL). ``hospital_mod.py`` is the
hospital's side (a Flower mod around the train handler), ``server_grid.py`` the server's
(a Grid that runs the stages under the strategy, which then sees only the aggregate).
"""
