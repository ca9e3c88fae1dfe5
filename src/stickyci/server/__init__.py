"""The cache server: the store over HTTP for many runners, and a Bazel-compatible remote cache.

``app`` only wires it together: ``state`` is what every API shares (authentication, body limits,
thread hand-off, sending blobs, the error handler), ``api/`` holds one module per API, and
``schedule`` runs disk eviction and gc. Importing this package imports nothing heavy, so the
CLI starts without the ASGI stack; the wire format both sides share is ``store/protocol.py``.
"""
