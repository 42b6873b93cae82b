"""The worker's local channel index and the fan-out that reads it.

``(app, channel) -> local subscribers``. A channel with one local subscriber (the common
per-user private channel) maps straight to its connection; a set is made only for the
second one, which saves a set (about 220 bytes) per such channel.

A channel is here only once the broker has confirmed a subscription to it (a connection
is bound on the broker's ``ok``, or on a local answer that itself relied on one), so a
channel in the index is one the broker routes to this worker: a later subscriber of such
a plain channel is answered locally (see ``BrokerSync.subscribe``). The one binding made
without the broker's answer, a signed-in user's ``#server-to-user-`` channel, has a name
no client subscribe can carry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vask.workers.outbound import MAX_CORKED_FRAMES

if TYPE_CHECKING:
    from vask.workers.outbound import Corker
    from vask.workers.rosters import Rosters
    from vask.workers.websocket import PusherConnection

Key = tuple[str, str]


class ChannelIndex:
    """Which local connections are subscribed to which channel."""

    __slots__ = ("channels", "corker", "rosters")

    def __init__(self, corker: Corker, rosters: Rosters) -> None:
        self.corker = corker
        self.rosters = rosters
        self.channels: dict[Key, PusherConnection | set[PusherConnection]] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self.channels

    def bind(self, conn: PusherConnection, channel: str, on: bool) -> None:
        key = (conn.app_id, channel)
        channels = self.channels
        members = channels.get(key)
        if on:
            if members is None:
                channels[key] = conn
            elif isinstance(members, set):
                members.add(conn)
            elif members is not conn:
                channels[key] = {members, conn}
        elif isinstance(members, set):
            members.discard(conn)
            if len(members) == 1:
                channels[key] = next(iter(members))
        elif members is conn:
            del channels[key]
            self.rosters.left(key)

    def fan_out(self, app_id: str, channel: str, exclude: str, data: bytes,
                frames: int = 1) -> None:
        """Write ``data`` (``frames`` complete frames) to every local subscriber but
        ``exclude``.

        The hot path of a publish: the same bytes go to each connection through its
        :meth:`~vask.workers.outbound.Outbound.write` (so flow control and the hard
        limit apply), straight away; a connection that already has corked output gets
        them appended there instead, to keep its order. During a broker drain everything
        is corked and leaves in one write per connection after it (a burst of presence
        joins or events: one syscall per member, not per event).

        Counting costs nothing per subscriber: every target is a connection of the same
        app, so the app's counters get the whole fan-out in three additions at the end.
        """
        targets = self.channels.get((app_id, channel))
        if targets is None:
            return
        if type(targets) is not set:
            targets = (targets,)  # type: ignore[assignment]
        skipped = 0
        corker = self.corker
        if corker.corked:
            # Held whole when it can be (the flush writes it to each subscriber in one
            # pass); otherwise queued per connection.
            if not (type(targets) is set and targets and not exclude
                    and corker.share(targets, data)):
                if corker.shared is not None:
                    corker.spill()  # it goes before what is queued for these below
                # Outbound.queue, inline (the corker's flush comes after the drain)
                pending = corker.pending
                for conn in targets:  # type: ignore[union-attr]
                    if conn.socket_id == exclude:
                        skipped = 1
                        continue
                    out = conn.out
                    if out is None:
                        conn.out = [data]
                        pending.append(conn)
                    else:
                        out.append(data)
                        if len(out) >= MAX_CORKED_FRAMES:
                            conn.flush()  # a burst for one connection: let flow control see it
            corker.held += len(data) * (len(targets) - skipped)  # type: ignore[arg-type]
            if corker.held > corker.limit:
                corker.flush()
        else:
            for conn in targets:  # type: ignore[union-attr]
                if conn.socket_id == exclude:
                    skipped = 1
                    continue
                if conn.out is not None:
                    conn.queue(data)
                else:
                    conn.write(data)
        sent = len(targets) - skipped  # type: ignore[arg-type]
        if sent:
            # every target is a connection of this app: any one's counters are the app's
            stats = next(iter(targets)).stats  # type: ignore[arg-type]
            stats.deliveries += sent * frames
            stats.ws_messages_out += sent * frames
            stats.ws_bytes_out += sent * len(data)
