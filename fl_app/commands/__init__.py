"""The console scripts: ``clinical-fl`` (runs and sweeps), ``clinical-fl-audit``,
``clinical-fl-ledger``, ``clinical-fl-predict``, and the ``flwr`` processes they start."""
