"""The one-run empirical privacy audit: canaries, their scores, the epsilon lower bound."""
