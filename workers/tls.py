"""TLS on the listening port: the server-side ``SSLContext`` every worker serves with.

With ``tls_cert`` and ``tls_key`` set, each worker wraps the connections it accepts on
its own shard in TLS, so ``wss://`` and ``https://`` (WebSockets, the HTTP API, ``/up``
and ``/ready``) share the one port. The HTTP and WebSocket protocols do not change:
asyncio puts the TLS layer between the socket and them, and their writes (corked, one
per connection per loop turn) become TLS records there.

The context keeps Python's server defaults (its cipher list, which leaves out the weak
suites) and adds what those defaults leave open: TLS 1.2 at least, no TLS-level
compression (CRIME), and the server's cipher order rather than the client's.

Certificates expire and are renewed while connections stay open. :func:`reload_context`
reads the files again into the *same* context: OpenSSL takes the certificate for a
handshake from the context when the handshake starts, so new connections get the new
certificate and those already open keep the session they have.
"""

from __future__ import annotations

import ssl

from vask.config import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context to serve TLS with, or ``None`` when TLS is not configured.

    Raises ``ssl.SSLError`` or ``OSError`` when the files do not load (the configuration
    check has loaded them once already, so this means they changed since).
    """
    if not settings.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def reload_context(context: ssl.SSLContext, settings: Settings) -> None:
    """Read the certificate chain and key again into ``context``, in place.

    New handshakes use the new pair; open connections are not touched. The pair is first
    loaded into a scratch context: OpenSSL installs the certificate before it reads the
    key, so a live context fed a key that does not match would be left with neither and
    fail every handshake. A pair that does not load raises here (``ssl.SSLError`` or
    ``OSError``) and the live context keeps the pair it had.
    """
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert,
                                                           settings.tls_key)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
