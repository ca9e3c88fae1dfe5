"""The GitHub Actions cache's logic apart from HTTP: entries and key matching, the tar cuts
that make successive archives deduplicate, and the signed upload and download URLs."""

from .cache import UPLOAD_TTL, CacheEntry, GhaCache, check_key, check_version
from .tar import tar_pieces
from .urls import UrlSigner

__all__ = ["UPLOAD_TTL", "CacheEntry", "GhaCache", "UrlSigner", "check_key", "check_version",
           "tar_pieces"]
