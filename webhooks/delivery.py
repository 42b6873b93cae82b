"""One HTTP attempt of a webhook request, and the headers it carries.

Receivers are untrusted: whatever they answer (garbage, a huge or endless body, a
connection that hangs) ends as an :class:`Outcome` within ``timeout`` seconds, never as
an exception. Only the status line and headers matter; at most :data:`BODY_LIMIT`
bytes of the body are read (so that a small answer leaves the connection reusable)
and a larger or slower body just closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from vask import __version__
from vask.config import App, Webhook
from vask.signing import sign

#: response body bytes read at most
BODY_LIMIT = 64 * 1024
USER_AGENT = f"Vask-Webhooks/{__version__}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to: a status, or the error that prevented one."""

    status: int | None = None
    error: str = ""
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status <= 299

    def reason(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else self.error


def headers_for(app: App, hook: Webhook, body: bytes) -> dict[str, str]:
    """The request headers: signed with the app's current secret over the exact body.

    Content-Type is exactly ``application/json`` with no parameters: the Node SDK
    compares it for equality.
    """
    headers = dict(hook.headers)
    headers.update({
        "Content-Type": "application/json",
        "X-Pusher-Key": app.key,
        "X-Pusher-Signature": sign(app.secret, body),
        "User-Agent": USER_AGENT,
    })
    return headers


def new_session(timeout: float) -> aiohttp.ClientSession:
    """The process's one client session: pooled keep-alive connections to every
    endpoint (the per-endpoint limit is the sender's), TLS verified, no proxy taken
    from the environment, no cookies kept between requests."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )


async def post(session: aiohttp.ClientSession, url: str, body: bytes,
               headers: Mapping[str, str], timeout: float) -> Outcome:
    """POST ``body`` once; the whole exchange takes at most ``timeout`` seconds.

    Once the status line and headers are in, the attempt's outcome is decided: a body
    that is slow or too large only closes the connection.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            response = await session.post(url, data=body, headers=headers,
                                          allow_redirects=False)
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        return Outcome(error=f"no answer within {timeout:g}s")
    except aiohttp.ClientResponseError as exc:
        return Outcome(error=f"bad response ({exc.message})")
    except aiohttp.ClientError as exc:
        text = str(exc)
        return Outcome(error=f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    except Exception as exc:  # a receiver must never crash the sender
        return Outcome(error=f"{type(exc).__name__}: {exc}")
    try:
        outcome = Outcome(response.status, retry_after=response.headers.get("Retry-After"))
        try:
            async with asyncio.timeout_at(deadline):
                await _drain(response)
        except TimeoutError:
            response.close()
        return outcome
    finally:
        response.release()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read a small body so that the connection can be reused; close the connection
    instead on a large one. The status is already known, so errors here are moot."""
    try:
        left = BODY_LIMIT
        while left > 0:
            chunk = await response.content.read(min(left, 16 * 1024))
            if not chunk:
                return
            left -= len(chunk)
        response.close()
    except (aiohttp.ClientError, ValueError, OSError):
        response.close()
