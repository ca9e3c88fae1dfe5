"""The server's HTTP APIs, one module each; every module's ``routes(server)`` lists its routes.

A new API (a Nix binary cache, the GitHub Actions cache, a dashboard) is one module here and
one line in ``server/app.py``.
"""
