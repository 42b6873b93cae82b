"""Parent-side handle on the load-generator worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from vask.bench.loadgen import worker_main


class WorkerError(RuntimeError):
    """A worker command raised; the message carries the worker's repr of the error."""


class WorkerPool:
    """Spawns ``n`` worker processes and sends them commands asynchronously.

    Replies are matched to requests by id, so a long command (``connect``) can
    run while the parent keeps polling ``status`` for progress.
    """

    def __init__(self, n: int, cfg: dict[str, Any]) -> None:
        self.n = n
        self.cfg = cfg
        self.procs: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        self.pids: list[int] = []
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Any]] = {}

    async def start(self) -> None:
        """Spawn workers and wait for each to report ready."""
        # spawn, not fork: the parent may already hold an event loop, sockets
        # and a running server child, none of which a worker should inherit.
        ctx = mp.get_context("spawn")
        loop = asyncio.get_running_loop()
        for _ in range(self.n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, self.cfg), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)
        hello: list[asyncio.Future[Any]] = []
        for pipe in self.pipes:
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending[-len(hello) - 1] = fut
            hello.append(fut)
            loop.add_reader(pipe.fileno(), self._on_readable, pipe, -len(hello))
            # uvloop makes watched fds non-blocking; multiprocessing's recv of a
            # large message needs a blocking fd, or it fails part-way.
            os.set_blocking(pipe.fileno(), True)
        replies = await asyncio.wait_for(asyncio.gather(*hello), 60)
        self.pids = [r["pid"] for r in replies]

    def _on_readable(self, pipe: Connection, hello_id: int) -> None:
        try:
            rid, status, payload = pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            for pending in self._pending.values():
                if not pending.done():
                    pending.set_exception(WorkerError("a load-generator process died"))
            return
        fut: asyncio.Future[Any] | None = self._pending.pop(hello_id if rid == 0 else rid, None)
        if fut is None or fut.done():
            return
        if status == "ok":
            fut.set_result(payload)
        else:
            fut.set_exception(WorkerError(str(payload)))

    def call(self, i: int, cmd: str, args: dict[str, Any] | None = None) -> asyncio.Future[Any]:
        """Send one command to worker ``i``; the future resolves with its reply."""
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.pipes[i].send((rid, cmd, args or {}))
        return fut

    async def call_all(
        self, cmd: str, args: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> list[Any]:
        """Send ``cmd`` to every worker (same args, or one dict per worker) and gather."""
        per = args if isinstance(args, list) else [args or {}] * self.n
        return list(await asyncio.gather(*(self.call(i, cmd, per[i]) for i in range(self.n))))

    async def stop(self) -> None:
        """Ask workers to close their connections and exit; kill stragglers by PID."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call_all("close"), 10)
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                loop.remove_reader(pipe.fileno())
        for p in self.procs:
            await asyncio.to_thread(p.join, 5)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)
        for pipe in self.pipes:
            pipe.close()


def split_counts(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal non-negative counts."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
