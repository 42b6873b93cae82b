"""Client events straight to the other workers of this host, without the broker.

A client event is delivered by the worker that read it to its own subscribers at once;
the other workers' subscribers used to get it through the broker (worker -> broker ->
workers). On a ZeroMQ link every message wakes the sender's I/O thread, the broker's
I/O and main threads, and so on at the other end, and measured on a 2-core VM the hop
cost more CPU than the deliveries it carried (docs/benchmarks.md, fourth pass). Client
events need nothing the broker has: the receiving workers filter by their own channel
index, and no answer goes back. So, when every worker of the cluster is a sibling on
this host (``vask run`` with its own broker), a client event goes to each sibling over
a Unix stream socket (one ``send`` each, from the event loop's thread), and to the
broker not at all:

* Each worker listens on a socket in the supervisor's private runtime directory
  (``siblings/<pid>``, bound under a hidden name and renamed once it listens) before it
  accepts connections, and removes it when it stops.
* A sender lists the directory again whenever its modification time changed (one
  ``stat`` per client event) and connects to the sockets it has not met, at once: a
  connection to a listening Unix socket is complete when ``connect`` returns, and what
  is sent waits in the kernel until the sibling reads it. So a worker that started,
  even mid rolling restart, receives every client event sent after its socket
  appeared, which is before any of its clients could subscribe. A draining worker
  keeps its socket until it exits, so its remaining clients keep receiving.
* A message is ``[4-byte length][2-byte header length][JSON [app, channel, exclude]]
  [payload]``, the payload being the exact event frame the sender's own subscribers got.
  (Datagrams would need no framing, but Linux queues at most ``net.unix.max_dgram_qlen``
  of them per socket, 10 by default: a busy sibling would lose a burst.)
* A sibling that does not read (stalled or overloaded) gets what it cannot take
  buffered, up to :data:`MAX_BUFFERED` bytes; past that its client events are dropped,
  counted (``vask_sibling_drops``) and logged at most once a minute. The broker path
  drops too when a worker's queue is full.

The broker path stays for what needs the broker: an app with a ``client_event`` webhook,
and any cluster whose broker is shared with other hosts (``vask run --broker``), where
the sibling directory is not given.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import orjson

from vask.config import Settings
from vask.workers.wsframe import text_frame

if TYPE_CHECKING:
    from vask.workers.server import Worker

log = logging.getLogger("vask.worker")

#: bytes a sibling may leave unread before its client events are dropped
MAX_BUFFERED = 8 * 1024 * 1024
#: largest message accepted from a sibling (a client event is at most
#: ``max_event_payload_kb`` plus its frame; anything larger means a broken stream)
MAX_MESSAGE = 16 * 1024 * 1024
#: bytes read from one sibling connection per loop turn
READ_BYTES = 256 * 1024
DROP_LOG_INTERVAL = 60.0
#: a directory changed this recently (ns) is listed again on every send (see recheck)
RECENT_NS = 200_000_000


class _Peer:
    """Our connection to one sibling, and what it has not taken yet."""

    __slots__ = ("fd", "out", "path", "sock")

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self.fd = sock.fileno()
        self.out = bytearray()


class Siblings:
    """This worker's listening socket among its siblings', and its connections."""

    def __init__(self, worker: Worker, directory: str) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.directory = directory
        self.name = str(os.getpid())
        self.path = os.path.join(directory, self.name)
        listener = self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.setblocking(False)
        # Bound under a hidden name and renamed once it listens: a sibling that saw the
        # socket between bind and listen would be refused, and take it for a dead one.
        hidden = os.path.join(directory, f".{self.name}")
        for stale in (hidden, self.path):  # left by an earlier process with our pid
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        listener.bind(hidden)
        listener.listen(256)
        os.rename(hidden, self.path)
        #: siblings we send to, by socket path
        self.peers: dict[str, _Peer] = {}
        #: the directory's modification time when ``peers`` was last matched to it
        self.listed = -1
        #: match again on the next send even if that time did not change: it was
        #: recent when we listed, and file times advance in clock ticks, so a socket
        #: bound within the same tick would not change it again
        self.recheck = False
        #: connections from siblings: fd -> (socket, unparsed bytes)
        self.inbound: dict[int, tuple[socket.socket, bytearray]] = {}
        self.unlogged = 0
        self.next_log = 0.0
        self.counts = worker.metrics.siblings
        self.hooked = hooked_apps(worker.settings)
        self.closed = False
        self.loop.add_reader(listener.fileno(), self._accept)

    def reload(self, settings: Settings) -> None:
        self.hooked = hooked_apps(settings)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._unwatch(self.listener, writer=False)
        for peer in list(self.peers.values()):
            self._forget(peer)
        for sock, _ in list(self.inbound.values()):
            self._unwatch(sock, writer=False)
        self.inbound.clear()

    def _unwatch(self, sock: socket.socket, writer: bool) -> None:
        with contextlib.suppress(ValueError, OSError):
            fd = sock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
                if writer:
                    self.loop.remove_writer(fd)
        sock.close()

    # --- sending --------------------------------------------------------------------

    def send(self, app_id: str, channel: str, exclude: str, payload: bytes) -> bool:
        """Send a client event to every sibling; False if it must go through the broker
        instead (its app wants ``client_event`` webhooks)."""
        if self.closed or app_id in self.hooked:
            return False
        head = orjson.dumps([app_id, channel, exclude])
        size = 2 + len(head) + len(payload)
        message = b"".join((size.to_bytes(4, "big"), len(head).to_bytes(2, "big"), head,
                            payload))
        try:
            changed = os.stat(self.directory).st_mtime_ns
        except OSError:  # the runtime directory went away: we are being stopped
            return False
        if changed != self.listed or self.recheck:
            self._match(changed)
        for peer in list(self.peers.values()):
            self._write(peer, message)
        return True

    def _match(self, changed: int) -> None:
        """Connect to siblings that appeared, let go of those that went."""
        self.listed = changed
        self.recheck = time.time_ns() - changed < RECENT_NS
        try:
            names = set(os.listdir(self.directory))
        except OSError:
            names = set()
        names = {n for n in names if not n.startswith(".")}  # not listening yet
        names.discard(self.name)
        for path, peer in list(self.peers.items()):
            if os.path.basename(path) not in names:
                self._forget(peer)
        for name in names:
            path = os.path.join(self.directory, name)
            if path not in self.peers:
                self._connect(path)

    def _connect(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ECONNREFUSED:
                # nobody listens: its worker died without removing it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            elif exc.errno != errno.ENOENT:
                # EAGAIN: its backlog is full; try again with the next client event
                self.recheck = True
                log.warning("cannot reach sibling worker %s: %s", path, exc.strerror)
            return
        peer = self.peers[path] = _Peer(path, sock)
        # the sibling never writes to us: readable means it closed (or failed)
        self.loop.add_reader(peer.fd, self._closed_by, peer)

    def _closed_by(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._forget(peer)

    def _forget(self, peer: _Peer) -> None:
        if self.peers.get(peer.path) is peer:
            del self.peers[peer.path]
        self._unwatch(peer.sock, writer=True)

    def _write(self, peer: _Peer, message: bytes) -> None:
        out = peer.out
        if out:
            if len(out) + len(message) > MAX_BUFFERED:
                self._dropped()
                return
            out += message
            self.counts["sent"] += 1
            return
        try:
            sent = peer.sock.send(message)
        except BlockingIOError:
            sent = 0
        except OSError:  # it went (EPIPE, ECONNRESET)
            self._forget(peer)
            return
        self.counts["sent"] += 1
        if sent < len(message):
            out += message[sent:]
            self.loop.add_writer(peer.fd, self._flush, peer)

    def _flush(self, peer: _Peer) -> None:
        out = peer.out
        try:
            sent = peer.sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self._forget(peer)
            return
        del out[:sent]
        if not out:
            self.loop.remove_writer(peer.fd)

    def _dropped(self) -> None:
        self.counts["drops"] += 1
        self.unlogged += 1
        now = time.monotonic()
        if now >= self.next_log:
            self.next_log = now + DROP_LOG_INTERVAL
            log.warning("%d client event(s) not delivered to a sibling worker: it has "
                        "left %d bytes unread (it is overloaded or stalled)",
                        self.unlogged, MAX_BUFFERED)
            self.unlogged = 0

    # --- receiving ------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the next turn tries again
                log.warning("cannot accept a sibling worker's connection: %s", exc.strerror)
                return
            sock.setblocking(False)
            fd = sock.fileno()
            self.inbound[fd] = (sock, bytearray())
            self.loop.add_reader(fd, self._read, fd)

    def _read(self, fd: int) -> None:
        """Deliver what a sibling sent to this worker's subscribers; several events read
        in one go leave corked, one write per subscriber."""
        entry = self.inbound.get(fd)
        if entry is None:
            return
        sock, buffered = entry
        try:
            data = sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            del self.inbound[fd]
            self._unwatch(sock, writer=False)
            return
        buffered += data
        events: list[bytes] = []
        at = 0
        end = len(buffered)
        while end - at >= 4:
            size = int.from_bytes(buffered[at:at + 4], "big")
            if size > MAX_MESSAGE:
                log.warning("dropped a sibling worker's connection: a %d-byte message", size)
                del self.inbound[fd]
                self._unwatch(sock, writer=False)
                return
            if end - at - 4 < size:
                break
            events.append(bytes(buffered[at + 4:at + 4 + size]))
            at += 4 + size
        del buffered[:at]
        if events:
            self._deliver(events)

    def _deliver(self, events: list[bytes]) -> None:
        self.counts["received"] += len(events)
        worker = self.worker
        corker = worker.corker
        cork = len(events) > 1 and not corker.corked
        if cork:
            corker.cork(True)
        try:
            fan_out = worker.index.fan_out
            for data in events:
                event = parse(data)
                if event is None:
                    log.warning("dropped a malformed message from a sibling worker")
                    continue
                app_id, channel, exclude, payload = event
                fan_out(app_id, channel, exclude, text_frame(payload))
        finally:
            if cork:
                corker.cork(False)


def parse(data: bytes) -> tuple[str, str, str, bytes] | None:
    """(app id, channel, excluded socket id, payload) of one sibling message (without
    its length), or None if it is malformed."""
    if len(data) < 2:
        return None
    size = int.from_bytes(data[:2], "big")
    try:
        head = orjson.loads(data[2:2 + size])
    except orjson.JSONDecodeError:
        return None
    if type(head) is not list or len(head) != 3 or not all(type(h) is str for h in head):
        return None
    return head[0], head[1], head[2], data[2 + size:]


def hooked_apps(settings: Settings) -> frozenset[str]:
    """Ids of the apps with a webhook that wants ``client_event``: their client events
    go through the broker, which generates the webhook."""
    return frozenset(app.id for app in settings.apps
                     if any("client_event" in hook.event_types for hook in app.webhooks))
