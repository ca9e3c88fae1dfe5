"""The cache server: the store over HTTP for many runners, and a Bazel-compatible remote cache.

Importing this package imports nothing heavy: ``protocol`` is shared with the ``http://``
client, which must not pay for the ASGI stack.
"""
