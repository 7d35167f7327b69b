"""Secure aggregation: the server learns only the sum of the hospitals' updates.

Two modes (``clinical_fl/settings/secure_aggregation.py``): SecAgg+ (``secagg_plus.py``: Flower's
protocol stages, ported to Message-API messages on Flower's own cryptographic helpers)
and CKKS homomorphic encryption (``ckks.py``, TenSEAL).
``fl_app/hospital/secure_aggregation_mod.py``
is the hospital's side (a Flower mod around the train handler),
``fl_app/server/grids/secure_aggregation.py`` the server's
(a Grid that runs the stages under the strategy, which then sees only the aggregate).
"""
