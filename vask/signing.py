"""HMAC-SHA256 signatures of the Pusher protocol.

All signatures are lowercase hex HMAC-SHA256 keyed by the app secret. Verification always
compares in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def sign(secret: str, message: str | bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``message`` keyed by ``secret``."""
    data = message.encode() if isinstance(message, str) else message
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def channel_string(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """The string signed for a private (``socket_id:channel``) or presence
    (``socket_id:channel:channel_data``) subscription."""
    if channel_data is None:
        return f"{socket_id}:{channel}"
    return f"{socket_id}:{channel}:{channel_data}"


def user_string(socket_id: str, user_data: str) -> str:
    """The string signed for ``pusher:signin``: ``socket_id::user::user_data``."""
    return f"{socket_id}::user::{user_data}"


def verify_auth(key: str, secret: str, auth: object, string_to_sign: str) -> bool:
    """Check an ``app_key:signature`` auth token against ``string_to_sign``.

    The key prefix must be this app's key; the hex part is compared in constant time.
    """
    if not isinstance(auth, str):
        return False
    prefix, sep, signature = auth.partition(":")
    if not sep or prefix != key:
        return False
    expected = sign(secret, string_to_sign)
    return hmac.compare_digest(expected.encode(), signature.lower().encode())


def http_string_to_sign(method: str, path: str, params: Iterable[tuple[str, str]]) -> str:
    """``METHOD\\nPATH\\nk=v&...`` over the decoded query minus ``auth_signature``,
    keys lower-cased and sorted."""
    pairs = sorted(
        (k.lower(), v) for k, v in params if k.lower() != "auth_signature"
    )
    query = "&".join(f"{k}={v}" for k, v in pairs)
    return f"{method.upper()}\n{path}\n{query}"


def body_md5(body: bytes) -> str:
    """Hex MD5 of a raw request body (the ``body_md5`` query parameter)."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def signatures_match(expected: str, given: str) -> bool:
    """Constant-time comparison of two hex signatures (case-insensitive)."""
    return hmac.compare_digest(expected.lower().encode(), given.lower().encode())
