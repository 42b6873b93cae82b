"""The worker's connection layer without sockets: HTTP bounds, pipelining, flow control,
WebSocket admission rules.

A fake transport records what is written and whether reading is paused; a minimal
worker stands in for the real one (only what the protocols read from it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from vask.config import load_settings
from vask.metrics import WorkerMetrics
from vask.workers.admission import Admission, websocket_problem
from vask.workers.http import BURST_REQUESTS, MAX_PIPELINED, HttpProtocol
from vask.workers.index import ChannelIndex
from vask.workers.outbound import MAX_CORKED_FRAMES, Corker
from vask.workers.websocket import PusherConnection


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.reading = True
        self.closed = False
        self.aborted = False
        self.eof = False
        self.buffered = 0  # what get_write_buffer_size reports
        self.protocol: Any = None
        self.limits: tuple[int, int] = (0, 0)
        self.writing_paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        # as asyncio's transports do: above the high-water mark, the protocol is told
        # before write returns (once, until it is resumed)
        if self.buffered > self.limits[0] and not self.writing_paused \
                and self.protocol is not None:
            self.writing_paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high or 0, low or 0)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 5555) if name == "peername" else default

    @property
    def text(self) -> bytes:
        return b"".join(self.written)


def make_worker(loop: asyncio.AbstractEventLoop, routes: Any = None,
                **server: Any) -> Any:
    settings = load_settings(env={}, overrides=server) if server else load_settings(env={})
    metrics = WorkerMetrics([app.id for app in settings.apps])
    worker: Any = SimpleNamespace(
        settings=settings, clock=100.0, wall=1_000_000.0, connections=set(),
        counters=metrics.events, corker=Corker(loop, 262_144), stopping=False, loop=loop,
        metrics=metrics, held={},
    )
    worker.admission = Admission(worker)
    worker.http_route = routes or (
        lambda method, url, headers, body, keep_alive: b"HTTP/1.1 200 OK\r\n\r\n" + url)
    return worker


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connect(worker: Any) -> tuple[HttpProtocol, FakeTransport]:
    conn = HttpProtocol(worker)
    transport = FakeTransport()
    transport.protocol = conn
    conn.connection_made(transport)
    return conn, transport


def status_of(transport: FakeTransport) -> int:
    return int(transport.text.split(b" ", 2)[1])


# --- request bounds --------------------------------------------------------------------


def test_flow_control_marks_are_set_on_accept(loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    _, transport = connect(worker)
    assert transport.limits == (262_144, 65_536)


def test_a_head_over_the_limit_in_one_read_gets_431(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.data_received(b"GET /up HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert status_of(transport) == 431
    assert transport.eof and conn.lingering


def test_a_head_growing_over_many_reads_is_cut_at_the_limit(
        loop: asyncio.AbstractEventLoop) -> None:
    """The huge-header attack: the head never completes; it is refused once the bytes
    fed for it pass the limit (at most one read late), not after the client stops."""
    conn, transport = connect(make_worker(loop))
    conn.data_received(b"GET /up HTTP/1.1\r\nX-Big: ")
    fed = 0
    while not transport.written and fed < 1_000_000:
        conn.data_received(b"a" * 4096)
        fed += 4096
    assert status_of(transport) == 431
    assert fed <= 16_384 + 4096
    # once refused, more input is discarded, not parsed
    conn.data_received(b"a" * 65536)
    assert transport.text.count(b"HTTP/1.1") == 1


def test_a_long_url_gets_414(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.data_received(b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert status_of(transport) == 414


def test_too_many_headers_get_431(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.data_received(b"GET /up HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n")
    assert status_of(transport) == 431


def test_a_big_body_gets_413(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.data_received(b"POST /apps/1/events HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
    conn.data_received(b"x" * 1_100_000)
    assert status_of(transport) == 413


def test_a_body_after_a_head_is_not_counted_as_head(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 40000\r\n\r\n" + b"b" * 20_000)
    conn.data_received(b"b" * 20_000)
    assert status_of(transport) == 200


def test_a_slow_request_gets_408_at_its_deadline(loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    conn, transport = connect(worker)
    conn.data_received(b"GET /u")
    began = time.monotonic()
    conn.sweep(began + 9.5)
    assert not transport.written
    conn.sweep(began + 10.5)
    assert status_of(transport) == 408
    conn.sweep(time.monotonic() + 2.5)  # lingering is over: gone
    assert transport.aborted


def test_idle_keep_alive_connections_are_closed(loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    conn, transport = connect(worker)
    conn.data_received(b"GET /up HTTP/1.1\r\n\r\n")
    answered = time.monotonic()
    assert status_of(transport) == 200
    conn.sweep(answered + 29.0)
    assert not transport.closed
    conn.sweep(answered + 31.0)
    assert transport.closed


def test_a_connection_that_sends_nothing_is_closed(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.sweep(time.monotonic() + 10.5)
    assert transport.closed and not transport.written


# --- pipelining and flow control ---------------------------------------------------------


def test_pipelined_answers_keep_request_order(loop: asyncio.AbstractEventLoop) -> None:
    release = loop.create_future()

    async def slow() -> bytes:
        await release
        return b"<slow>"

    def routes(method: str, url: bytes, *_: Any) -> Any:
        return (lambda: slow()) if url == b"/slow" else b"<" + url + b">"

    conn, transport = connect(make_worker(loop, routes))
    conn.data_received(b"GET /a HTTP/1.1\r\n\r\nGET /slow HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    assert transport.text == b"</a>"
    assert not transport.reading  # not read while answers wait
    release.set_result(None)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert transport.text == b"</a><slow></b>"
    assert transport.reading


def test_too_many_pipelined_requests_end_in_503(loop: asyncio.AbstractEventLoop) -> None:
    release = loop.create_future()

    async def slow() -> bytes:
        await release
        return b"<slow>"

    conn, transport = connect(make_worker(loop, lambda *_: lambda: slow()))
    conn.data_received(b"GET /x HTTP/1.1\r\n\r\n" * (MAX_PIPELINED + 10))
    release.set_result(None)
    loop.run_until_complete(asyncio.sleep(0.05))
    answers = transport.text
    assert answers.count(b"<slow>") == MAX_PIPELINED
    assert answers.endswith(b"}") and b"503 Service Unavailable" in answers
    assert transport.eof


def test_reading_pauses_above_high_water_and_resumes(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    conn.pause_writing()  # what asyncio calls above write_buffer_high
    assert not transport.reading
    conn.resume_writing()
    assert transport.reading


def test_a_connection_over_the_hard_limit_is_cut(loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    conn, transport = connect(worker)
    transport.buffered = 4 * 1_048_576 + 1
    conn.data_received(b"GET /up HTTP/1.1\r\n\r\n")
    assert transport.aborted
    assert worker.counters["slow_consumers_cut"] == 1


# --- connection caps ---------------------------------------------------------------------


def test_over_the_worker_cap_a_connection_gets_503(loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop, max_connections_per_worker=2)
    connect(worker)
    connect(worker)
    _, transport = connect(worker)
    assert status_of(transport) == 503


def test_over_the_address_cap_a_connection_gets_429(loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop, max_connections_per_ip=1)
    first, _ = connect(worker)
    _, transport = connect(worker)
    assert status_of(transport) == 429
    first.connection_lost(None)
    _, again = connect(worker)
    assert not again.written  # the slot was given back


# --- WebSocket admission -------------------------------------------------------------------


@pytest.mark.parametrize("query, code", [
    ("protocol=%C2%B2", 4006),  # superscript two: isdigit() but not a version
    ("protocol=%EF%BC%97", 4006),  # fullwidth seven
    ("protocol=" + "7" * 5000, 4006),
    ("protocol=abc", 4006),
    ("protocol=", 4006),
    ("protocol=3", 4007),
    ("protocol=8", 4007),
    ("protocol=007", None),
])
def test_protocol_versions(query: str, code: int | None) -> None:
    settings = load_settings(env={})
    apps = {a.key: a for a in settings.apps}
    answer = websocket_problem(f"/app/app-key?{query}", apps, stopping=False)
    if code is None:
        assert not isinstance(answer, tuple)
    else:
        assert isinstance(answer, tuple) and answer[0] == code


def test_corked_bytes_past_the_high_water_mark_are_written_at_once(
        loop: asyncio.AbstractEventLoop) -> None:
    """Pongs to a burst of pings read in one wake-up must meet the transport's flow
    control, not pile up in the cork list until the end of the turn."""
    conn, transport = connect(make_worker(loop))
    conn.queue(b"p" * 200_000)
    assert not transport.written  # corked
    conn.queue(b"p" * 100_000)
    assert len(transport.text) == 300_000


def test_a_read_of_thousands_of_pipelined_requests_is_answered_a_share_per_turn(
        loop: asyncio.AbstractEventLoop) -> None:
    """One read can hold ~13 000 pipelined requests (the loop reads up to 256 KB): they
    are answered a few hundred per loop turn, in order, with reading paused in between,
    so other connections get the worker between the shares."""
    worker = make_worker(loop)
    conn, transport = connect(worker)
    requests = b"".join(b"GET /r%d HTTP/1.1\r\n\r\n" % i for i in range(3000))
    conn.data_received(requests)

    def answered() -> list[bytes]:
        return [part.split(b"\r\n\r\n", 1)[1] for part in transport.written]

    first = len(answered())
    assert BURST_REQUESTS < first < 1000  # one share past the burst mark, not all
    assert not transport.reading
    shares = 1
    while len(answered()) < 3000:
        loop.run_until_complete(asyncio.sleep(0))
        shares += 1
        assert shares < 100
    assert answered() == [b"/r%d" % i for i in range(3000)]
    loop.run_until_complete(asyncio.sleep(0))
    assert transport.reading and conn not in worker.held


def test_a_large_body_is_parsed_in_one_turn(loop: asyncio.AbstractEventLoop) -> None:
    conn, transport = connect(make_worker(loop))
    body = b"b" * 500_000
    conn.data_received(b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert status_of(transport) == 200
    assert transport.reading


# --- fan-out during a broker drain -----------------------------------------------------


def _subscribers(worker: Any, n: int) -> tuple[ChannelIndex, list[tuple[Any, FakeTransport]]]:
    """``n`` WebSocket connections of app "1", socket ids 1.0 .. 1.n-1, all in "hot"."""
    index = ChannelIndex(worker.corker, SimpleNamespace())  # type: ignore[arg-type]
    conns = []
    for i in range(n):
        transport = FakeTransport()
        conn = PusherConnection(worker, transport, 0, None)
        transport.protocol = conn
        transport.limits = (worker.settings.write_buffer_high, worker.settings.write_buffer_low)
        conn.socket_id, conn.app_id = f"1.{i}", "1"
        index.bind(conn, "hot", True)
        conns.append((conn, transport))
    return index, conns


def test_a_corked_fan_out_leaves_in_one_write_per_subscriber_after_the_drain(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    corker = worker.corker
    index, conns = _subscribers(worker, 3)
    corker.cork(True)
    index.fan_out("1", "hot", "1.1", b"A")
    index.fan_out("1", "hot", "", b"B")
    assert not any(t.written for _, t in conns)  # corked until the drain ends
    corker.cork(False)
    corker.flush()
    assert [t.written for _, t in conns] == [[b"AB"], [b"B"], [b"AB"]]
    assert corker.held == 0 and not corker.pending
    assert worker.metrics.unknown.deliveries == 5


def test_a_corked_fan_out_keeps_a_connections_earlier_output_first(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    index, [(conn, transport)] = _subscribers(worker, 1)
    conn.queue(b"first ")  # e.g. a pong, queued before the drain
    worker.corker.cork(True)
    index.fan_out("1", "hot", "", b"then the event")
    worker.corker.cork(False)
    worker.corker.flush()
    assert transport.written == [b"first then the event"]


def test_a_long_corked_burst_for_one_connection_is_written_at_max_frames(
        loop: asyncio.AbstractEventLoop) -> None:
    """One drain of many events for a channel: past MAX_CORKED_FRAMES the connection's
    frames are written at once, so its transport's flow control sees them."""
    worker = make_worker(loop)
    index, [(_, transport)] = _subscribers(worker, 1)
    worker.corker.cork(True)
    for _ in range(MAX_CORKED_FRAMES):
        index.fan_out("1", "hot", "", b"e")
    assert transport.written == [b"e" * MAX_CORKED_FRAMES]
    index.fan_out("1", "hot", "", b"f")
    worker.corker.cork(False)
    worker.corker.flush()
    assert transport.written == [b"e" * MAX_CORKED_FRAMES, b"f"]


def test_a_corked_fan_out_over_the_byte_limit_is_written_at_once(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    index, conns = _subscribers(worker, 2)
    worker.corker.cork(True)
    index.fan_out("1", "hot", "", b"x" * 100_000)
    assert not any(t.written for _, t in conns)
    index.fan_out("1", "hot", "", b"y" * 100_000)  # 400 000 bytes held > 262 144
    assert [len(t.text) for _, t in conns] == [200_000, 200_000]


@pytest.mark.parametrize("exclude", ["", "1.9"], ids=["held-whole", "per-connection"])
def test_the_drains_flush_cuts_a_subscriber_over_the_hard_limit_and_skips_a_closed_one(
        loop: asyncio.AbstractEventLoop, exclude: str) -> None:
    worker = make_worker(loop)
    index, [(_, slow), (gone, closed), (_, fine)] = _subscribers(worker, 3)
    slow.buffered = worker.settings.write_buffer_limit + 1
    worker.corker.cork(True)
    index.fan_out("1", "hot", exclude, b"e")
    # an exclusion (even of nobody here) takes the per-connection path
    assert (worker.corker.shared is not None) is (exclude == "")
    gone.transport = None  # the connection was lost during the drain
    worker.corker.cork(False)
    worker.corker.flush()
    assert slow.aborted and worker.counters["slow_consumers_cut"] == 1
    assert not closed.written and fine.written == [b"e"]


# --- a corked fan-out held whole -------------------------------------------------------


def test_a_corked_fan_out_to_a_channel_is_held_whole_and_written_once_each(
        loop: asyncio.AbstractEventLoop) -> None:
    """One drain, two events of one busy channel: nothing is queued per connection; the
    flush writes both events to each subscriber in one write, and counts them."""
    worker = make_worker(loop)
    corker = worker.corker
    index, conns = _subscribers(worker, 3)
    corker.cork(True)
    index.fan_out("1", "hot", "", b"A")
    index.fan_out("1", "hot", "", b"B", frames=2)
    assert corker.shared is not None and not corker.pending
    assert all(conn.out is None for conn, _ in conns)
    assert corker.held == 6
    corker.cork(False)
    loop.run_until_complete(asyncio.sleep(0))  # cork(False) scheduled the flush
    assert [t.written for _, t in conns] == [[b"AB"]] * 3
    assert corker.shared is None and corker.held == 0
    assert worker.metrics.unknown.deliveries == 9


@pytest.mark.parametrize("how", ["queue", "write"])
def test_output_for_a_member_of_the_held_fan_out_comes_after_it(
        loop: asyncio.AbstractEventLoop, how: str) -> None:
    """Queued or written during the drain (or before its flush), a connection's own
    output follows the event held for it; other connections are not disturbed."""
    worker = make_worker(loop)
    corker = worker.corker
    index, [(member, transport), (_, t2), (_, t3)] = _subscribers(worker, 3)
    corker.cork(True)
    index.fan_out("1", "hot", "", b"E")
    getattr(member, how)(b"-own")  # e.g. a pong queued, or an answer written at once
    assert corker.shared is None  # spilled into per-connection output
    assert transport.written == ([b"E-own"] if how == "write" else [])
    corker.cork(False)
    corker.flush()
    assert transport.written == [b"E-own"]
    assert t2.written == t3.written == [b"E"]


def test_output_for_another_connection_leaves_the_held_fan_out_whole(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    corker = worker.corker
    index, conns = _subscribers(worker, 2)
    other = PusherConnection(worker, FakeTransport(), 0, None)
    corker.cork(True)
    index.fan_out("1", "hot", "", b"E")
    other.queue(b"pong")
    assert corker.shared is not None and corker.pending == [other]
    corker.cork(False)
    corker.flush()
    assert [t.written for _, t in conns] == [[b"E"], [b"E"]]
    assert other.transport.written == [b"pong"]  # type: ignore[attr-defined]


def test_a_fan_out_to_other_connections_spills_the_held_one_in_order(
        loop: asyncio.AbstractEventLoop) -> None:
    """Two channels with a subscriber in common, one drain: each connection gets its
    events in the order they were fanned out."""
    worker = make_worker(loop)
    corker = worker.corker
    index, [(_, ta), (b, tb), (c, tc)] = _subscribers(worker, 3)
    index.bind(b, "other", True)
    index.bind(c, "other", True)
    corker.cork(True)
    index.fan_out("1", "hot", "", b"1")
    index.fan_out("1", "other", "", b"2")
    index.fan_out("1", "hot", "", b"3")
    corker.cork(False)
    corker.flush()
    assert (ta.written, tb.written, tc.written) == ([b"13"], [b"123"], [b"123"])


def test_a_subscriber_joining_during_the_drain_gets_only_the_later_events(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    corker = worker.corker
    index, conns = _subscribers(worker, 2)
    late = PusherConnection(worker, FakeTransport(), 0, None)
    late.socket_id, late.app_id = "1.7", "1"
    corker.cork(True)
    index.fan_out("1", "hot", "", b"before")
    index.bind(late, "hot", True)
    index.fan_out("1", "hot", "", b"-after")
    corker.cork(False)
    corker.flush()
    assert [t.written for _, t in conns] == [[b"before-after"]] * 2
    assert late.transport.written == [b"-after"]  # type: ignore[attr-defined]


def test_a_long_burst_held_whole_is_written_at_max_frames(
        loop: asyncio.AbstractEventLoop) -> None:
    worker = make_worker(loop)
    index, conns = _subscribers(worker, 2)
    worker.corker.cork(True)
    for _ in range(MAX_CORKED_FRAMES):
        index.fan_out("1", "hot", "", b"e")
    assert [t.written for _, t in conns] == [[b"e" * MAX_CORKED_FRAMES]] * 2
    index.fan_out("1", "hot", "", b"f")
    worker.corker.cork(False)
    worker.corker.flush()
    assert [t.written for _, t in conns] == [[b"e" * MAX_CORKED_FRAMES, b"f"]] * 2


def test_a_paused_connection_is_cut_only_over_the_hard_limit(
        loop: asyncio.AbstractEventLoop) -> None:
    """Above the high-water mark the transport pauses the connection (it stops being
    read); only above the hard limit is it cut."""
    worker = make_worker(loop)
    index, [(conn, transport), (_, fine)] = _subscribers(worker, 2)
    transport.buffered = worker.settings.write_buffer_high + 1
    worker.corker.cork(True)
    index.fan_out("1", "hot", "", b"e")
    worker.corker.cork(False)
    worker.corker.flush()
    assert conn.paused and not transport.reading and not transport.aborted
    transport.buffered = worker.settings.write_buffer_limit + 1
    conn.write(b"more")
    assert transport.aborted and worker.counters["slow_consumers_cut"] == 1
    assert fine.written == [b"e"] and not fine.aborted
