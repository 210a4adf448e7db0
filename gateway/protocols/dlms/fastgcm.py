"""AES-GCM for gurux-dlms from ``cryptography`` instead of gurux's pure-Python cipher.

gurux-dlms 1.0.203 computes every GMAC tag with an AES and GHASH written in Python
(about 1.3 ms per 30-byte operation, so ~6 ms per HLS-protected read); OpenSSL through
``cryptography`` does it in microseconds. gurux builds a ``GXDLMSChipperingStream`` for each
operation (``write()`` the data, ``flushFinalBlock()``, read ``tag``); :class:`FastGcmStream`
offers that interface and :func:`install` puts it in place of gurux's class in the one module
that uses it for suite-0 ciphering (``gurux_dlms.GXDLMSChippering``). Key wrapping and the
other suites keep gurux's own code.
"""

from __future__ import annotations

import hmac
import importlib
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gurux_dlms.enums.Security import Security

__all__ = ["FastGcmStream", "install"]

_TAG_LEN = 12


class FastGcmStream:
    """Drop-in for ``GXDLMSChipperingStream(security, encrypt, key, aad, iv, tag)``."""

    def __init__(self, security: Any, for_encrypt: bool, key: Any, aad: Any, iv: Any, tag: Any) -> None:
        self.security = security
        self.encrypt = for_encrypt
        self._key = bytes(key)
        self._aad = bytes(aad) if aad else b""
        self._iv = bytes(iv)
        self.tag: bytearray = bytearray(tag) if tag else bytearray(_TAG_LEN)
        self._data = bytearray()

    @classmethod
    def tagsEquals(cls, tag1: Any, tag2: Any) -> bool:
        return hmac.compare_digest(bytes(tag1[:_TAG_LEN]), bytes(tag2[:_TAG_LEN]))

    def write(self, data: Any) -> None:
        self._data += bytes(data)

    def flushFinalBlock(self) -> bytearray:
        data = bytes(self._data)
        self._data.clear()
        if self.security == Security.ENCRYPTION:
            # no tag: plain CTR from counter 2, as GCM encrypts
            ctr = Cipher(algorithms.AES(self._key), modes.CTR(self._iv + b"\x00\x00\x00\x02")).encryptor()
            return bytearray(ctr.update(data) + ctr.finalize())
        if self.encrypt:
            enc = Cipher(algorithms.AES(self._key), modes.GCM(self._iv)).encryptor()
            enc.authenticate_additional_data(self._aad)
            out = enc.update(data) + enc.finalize()
            self.tag = bytearray(enc.tag[:_TAG_LEN])
            return bytearray(out)
        dec = Cipher(
            algorithms.AES(self._key), modes.GCM(self._iv, bytes(self.tag), min_tag_length=_TAG_LEN)
        ).decryptor()
        dec.authenticate_additional_data(self._aad)
        try:
            return bytearray(dec.update(data) + dec.finalize())
        except Exception as exc:  # cryptography's InvalidTag: gurux callers expect ValueError
            raise ValueError("Decrypt failed. Invalid tag.") from exc


def install() -> None:
    """Make gurux's suite-0 ciphering use :class:`FastGcmStream` (idempotent)."""
    # gurux's package __init__ rebinds the name GXDLMSChippering to the class, so the
    # module is fetched by its full name, not by attribute.
    module = importlib.import_module("gurux_dlms.GXDLMSChippering")
    setattr(module, "GXDLMSChipperingStream", FastGcmStream)  # noqa: B010 - module attribute, typed Any
