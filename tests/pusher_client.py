"""A small Pusher protocol client for integration tests (websockets' asyncio client).

It records every frame and lets a test wait for a frame matching a predicate, with a
hard timeout, so no test can hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Collection
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from vask.signing import channel_string, sign, user_string

Frame = dict[str, Any]


class PusherClient:
    """One connection; ``frames`` holds everything received, in order."""

    def __init__(self, ws: ClientConnection, key: str, secret: str) -> None:
        self.ws = ws
        self.key = key
        self.secret = secret
        self.frames: list[Frame] = []
        self.socket_id = ""
        self.closed: asyncio.Future[tuple[int | None, str | None]] = \
            asyncio.get_running_loop().create_future()
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, key: str = "app-key", secret: str = "app-secret",
                      established: bool = True, **connect_options: Any) -> PusherClient:
        """``connect_options`` go to ``websockets.connect`` (``ssl=`` for a wss:// URL,
        ``origin=``, ``additional_headers=``)."""
        ws = await asyncio.wait_for(
            websockets.connect(url, open_timeout=10, **connect_options), 10)
        client = cls(ws, key, secret)
        if established:
            frame = await client.wait_for("pusher:connection_established")
            client.socket_id = json.loads(frame["data"])["socket_id"]
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.frames.append(json.loads(message))
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            if not self.closed.done():
                self.closed.set_result((rcvd.code, rcvd.reason) if rcvd else (None, None))
            self._new.set()

    async def send(self, message: Frame | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def wait(self, match: Callable[[Frame], bool], timeout: float = 10.0,
                   start: int = 0) -> Frame:
        """The first frame (from index ``start``) for which ``match`` is true."""
        async def scan() -> Frame:
            seen = start
            while True:
                for frame in self.frames[seen:]:
                    if match(frame):
                        return frame
                seen = len(self.frames)
                if self.closed.done():
                    raise AssertionError(f"closed {self.closed.result()} before match; "
                                         f"got {self.frames}")
                self._new.clear()
                await self._new.wait()
        return await asyncio.wait_for(scan(), timeout)

    async def wait_for(self, event: str, channel: str | None = None,
                       timeout: float = 10.0) -> Frame:
        return await self.wait(
            lambda f: f.get("event") == event and (channel is None or f.get("channel") == channel),
            timeout)

    async def absent(self, unwanted: Callable[[Frame], bool], marker: Callable[[Frame], bool],
                     timeout: float = 10.0) -> None:
        """Check that nothing ``unwanted`` arrived, without sleeping: wait for a frame
        matching ``marker`` (which the test caused *after* whatever could have produced
        an unwanted frame, on a path that delivers in order), then fail if any frame
        received so far is unwanted. Under load this waits longer instead of passing
        wrongly."""
        await self.wait(marker, timeout)
        bad = [f for f in self.frames if unwanted(f)]
        assert not bad, f"unwanted frames arrived before the marker: {bad}"

    def events(self, event: str, channel: str | None = None) -> list[Frame]:
        return [f for f in self.frames
                if f.get("event") == event and (channel is None or f.get("channel") == channel)]

    async def subscribe(self, channel: str, channel_data: str | None = None,
                        expect: str = "pusher_internal:subscription_succeeded") -> Frame:
        data: dict[str, Any] = {"channel": channel, "auth": ""}
        if channel.startswith(("private-", "presence-")):
            signed = channel_string(self.socket_id, channel,
                                    channel_data if channel.startswith("presence-") else None)
            data["auth"] = f"{self.key}:{sign(self.secret, signed)}"
        if channel_data is not None:
            data["channel_data"] = channel_data
        # Only an answer to this request: a retry after a refusal must not be handed
        # the earlier refusal again.
        start = len(self.frames)
        await self.send({"event": "pusher:subscribe", "data": data})
        return await self.wait(lambda f: f.get("channel") == channel and f.get("event") in
                               (expect, "pusher:subscription_error"), start=start)

    async def signin(self, user_data: dict[str, Any]) -> Frame:
        text = json.dumps(user_data)
        auth = f"{self.key}:{sign(self.secret, user_string(self.socket_id, text))}"
        await self.send({"event": "pusher:signin", "data": {"auth": auth, "user_data": text}})
        return await self.wait(lambda f: f.get("event") in ("pusher:signin_success",
                                                            "pusher:error"))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()


async def join_presence(client: PusherClient, channel: str, user: str,
                        deadline: float) -> None:
    """Join presence ``channel`` as ``user``, retrying every 0.2 s while the cluster
    refuses (a 503 while it recovers from a broker restart or move) until the monotonic
    ``deadline``; an assertion error names the last answer."""
    data = json.dumps({"user_id": user, "user_info": {"name": user}})
    while True:
        frame = await client.subscribe(channel, data)
        if frame["event"] == "pusher_internal:subscription_succeeded":
            return
        assert time.monotonic() < deadline, f"{user} could not join: {frame}"
        await asyncio.sleep(0.2)


async def connect_many(url: str, count: int, **kwargs: Any) -> list[PusherClient]:
    return list(await asyncio.gather(*(PusherClient.connect(url, **kwargs)
                                       for _ in range(count))))


async def close_all(clients: list[PusherClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


# --- placing clients on workers ------------------------------------------------------------
#
# A socket id is "{worker prefix}.{n}": the prefix (random, unique per worker process)
# names the worker that holds the connection. SO_REUSEPORT spreads new connections over
# the workers by a hash of the address pair, so a test that needs clients on particular
# workers connects until one lands where it is wanted, closing the others.

#: connections tried per placement before giving up (with W workers a connection misses
#: a wanted worker with probability (W-1)/W: 0.67**60 is about 4e-11)
PLACEMENT_ATTEMPTS = 60


def worker_of(client: PusherClient) -> str:
    """The id prefix of the worker holding ``client``."""
    return client.socket_id.split(".")[0]


def workers_of(clients: list[PusherClient]) -> set[str]:
    return {worker_of(c) for c in clients}


async def connect_on_worker(url: str, *, want: str | None = None,
                            avoid: Collection[str] = (),
                            attempts: int = PLACEMENT_ATTEMPTS,
                            **kwargs: Any) -> PusherClient:
    """A connected client on worker ``want``, or (without ``want``) on a worker whose
    prefix is not in ``avoid``. Connections that land elsewhere are closed. After
    ``attempts`` misses it fails, naming the workers it saw."""
    seen: dict[str, int] = {}
    for _ in range(attempts):
        client = await PusherClient.connect(url, **kwargs)
        prefix = worker_of(client)
        if (prefix == want) if want is not None else (prefix not in avoid):
            return client
        seen[prefix] = seen.get(prefix, 0) + 1
        await client.close()
    target = f"worker {want}" if want is not None else f"a worker other than {sorted(avoid)}"
    raise AssertionError(f"no connection landed on {target} in {attempts} attempts; "
                         f"they landed on {seen}")


async def connect_spread(url: str, count: int, workers: int,
                         **kwargs: Any) -> list[PusherClient]:
    """``count`` clients over ``workers`` distinct workers, round-robin: client ``i`` is
    on the same worker as client ``i % workers``, and clients 0..workers-1 are on
    different workers (so ``count >= workers`` covers every worker)."""
    clients: list[PusherClient] = []
    try:
        for i in range(count):
            if i < workers:
                clients.append(await connect_on_worker(url, avoid=workers_of(clients),
                                                       **kwargs))
            else:
                clients.append(await connect_on_worker(
                    url, want=worker_of(clients[i % workers]), **kwargs))
    except BaseException:
        await close_all(clients)
        raise
    return clients
