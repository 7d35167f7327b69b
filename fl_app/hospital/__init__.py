"""The hospital's side: the ClientApp and everything it runs, inside the trust boundary.

Checks every value the server sends (``received.py``) before any step, and sends only what
``replies.py`` builds; imports nothing of ``fl_app/server/`` or ``fl_app/commands/``.
"""
