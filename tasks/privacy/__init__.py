"""Record-level differential privacy inside a hospital: DP-SGD, its plan, and the ledger of
every private step the hospital has taken."""
