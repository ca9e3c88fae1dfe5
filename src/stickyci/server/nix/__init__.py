"""The Nix binary cache's logic apart from HTTP: narinfos, signing keys, and NAR storage."""

from .keys import KeyRing, SigningKey, check_cache, verify
from .narinfo import NarInfo, nix32, parse_narinfo, parse_sha256
from .nars import (
    UPLOAD_COMPRESSIONS,
    NarRecord,
    NarStore,
    NarUpload,
    checked,
    info_name,
    pin_name,
)
from .spool import Spool

__all__ = ["UPLOAD_COMPRESSIONS", "KeyRing", "NarInfo", "NarRecord", "NarStore", "NarUpload",
           "SigningKey", "Spool", "check_cache", "checked", "info_name", "nix32",
           "parse_narinfo", "parse_sha256", "pin_name", "verify"]
