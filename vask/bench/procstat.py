"""Process-tree resource accounting straight from /proc (Linux only, no psutil).

CPU is utime+stime from ``/proc/PID/stat`` (all threads included); memory is
VmRSS from ``/proc/PID/status`` and Pss from ``/proc/PID/smaps_rollup``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``comm`` field, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the *last* ')'.
    return raw[raw.rfind(")") + 2 :].split()


def parent_map() -> dict[int, list[int]]:
    """Map every live PID to the list of its children (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _read_stat(int(name))
        if fields is None:
            continue
        # After comm: [0]=state [1]=ppid
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (root first), empty if root is gone."""
    if not os.path.exists(f"/proc/{root}"):
        return []
    children = parent_map()
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process in seconds (0 if it has exited)."""
    fields = _read_stat(pid)
    if fields is None:
        return 0.0
    # After comm: utime is field 14 of the full line -> index 11 here, stime 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_seconds(pid: int) -> float:
    """Time on a CPU of one process's live threads, in seconds, to the nanosecond (the
    scheduler's own sum, /proc/PID/task/TID/schedstat), 0 if it has exited.

    utime+stime come in clock ticks (10 ms) and are sampled; over a window of a few
    hundred milliseconds that is a coarse and noisy figure. Threads that exited are not
    counted: compare windows over processes whose threads live throughout.
    """
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split(None, 1)[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def tree_run_seconds(root: int) -> float:
    """:func:`run_seconds` summed over ``root`` and its descendants."""
    return sum(run_seconds(pid) for pid in process_tree(root))


def rss_pss_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS falls back to RSS if unreadable."""
    rss = 0
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1]) * PAGE_SIZE // 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return 0, 0
    pss = rss
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                    break
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


@dataclass
class TreeSample:
    """A snapshot of a process tree: per-PID CPU seconds and summed memory."""

    pids: list[int]
    cpu: dict[int, float] = field(default_factory=dict)
    rss_kb: int = 0
    pss_kb: int = 0

    @property
    def cpu_total(self) -> float:
        """CPU seconds summed over the sampled processes."""
        return sum(self.cpu.values())


def sample_tree(root: int, memory: bool = False) -> TreeSample:
    """Sample CPU (and optionally RSS/PSS, which is slower) over ``root``'s tree."""
    return sample_pids(process_tree(root), memory=memory)


def sample_pids(pids: list[int], memory: bool = False) -> TreeSample:
    """Sample CPU (and optionally memory) for an explicit list of processes."""
    s = TreeSample(pids=list(pids))
    for pid in pids:
        s.cpu[pid] = cpu_seconds(pid)
        if memory:
            rss, pss = rss_pss_kb(pid)
            s.rss_kb += rss
            s.pss_kb += pss
    return s


def cpu_delta(before: TreeSample, after: TreeSample) -> dict[int, float]:
    """Per-PID CPU seconds spent between two samples.

    Processes that appeared in between count from zero; processes that died
    in between are lost (their CPU is only visible to their reaper).
    """
    return {pid: after.cpu[pid] - before.cpu.get(pid, 0.0) for pid in after.cpu}


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        parts = f.readline().split()
    vals = [int(x) for x in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    # guest/guest_nice (indices 8, 9) are already included in user/nice.
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK
