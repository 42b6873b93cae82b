"""``vask.zmqsend.send_frames``: the same message as pyzmq's ``send_multipart``, and the
same errors."""

from __future__ import annotations

import pytest
import zmq

from vask.zmqsend import send_frames


def test_frames_arrive_as_one_multipart_message() -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://zmqsend-a")
        push.connect("inproc://zmqsend-a")
        frames = [b"\x00" * 8, b"BATCH", b"[2]", b"HB", b"[1]"]
        send_frames(push, frames, int(zmq.NOBLOCK))
        send_frames(push, [b"alone"], 0)
        assert pull.recv_multipart() == frames
        assert pull.recv_multipart() == [b"alone"]
    finally:
        push.close(linger=0)
        pull.close(linger=0)


def test_a_full_queue_raises_again_and_queues_nothing() -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    try:
        push.setsockopt(zmq.SNDHWM, 1)
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.bind("inproc://zmqsend-b")
        push.connect("inproc://zmqsend-b")
        sent = 0
        with pytest.raises(zmq.Again):
            for _ in range(100):
                send_frames(push, [b"a", b"b", b"c"], int(zmq.NOBLOCK))
                sent += 1
        got = 0
        while pull.poll(100):
            assert pull.recv_multipart() == [b"a", b"b", b"c"]  # never a partial one
            got += 1
        assert got == sent >= 1
    finally:
        push.close(linger=0)
        pull.close(linger=0)
