"""The Flower apps and entry points, housed by role so the trust boundary shows in the tree.

- ``hospital/``: what runs inside a hospital (the ClientApp, its handlers, mods and checks);
- ``server/``: the coordinator (the ServerApp, preflight, resume, checkpoints, its Grids);
- ``commands/``: the console scripts that start runs and read results (``clinical-fl`` ...);
- ``exchange.py`` and ``console.py``: the only modules both apps import.

Hospital code never imports server code, nor server code hospital code
(``tests/test_layout.py``); what they say to each other is ``clinical_fl/protocol/``.
"""
