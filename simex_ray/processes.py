"""Which process a pid names, before anything signals it (Ray-free; Linux /proc).

A pid in a file can outlive its process and be reused by another one; before a signal is sent, the pid's
start time (clock ticks after boot, from ``/proc/PID/stat``) and command line are compared with what was
recorded when the file was written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    """A process as a pidfile records it: its pid and its start time (None: unknown, an old pidfile)."""

    pid: int
    start: int | None = None

    def to_text(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_text(cls, text: str) -> "ProcessRecord":
        """A record written by :meth:`to_text`, or an older pidfile's bare pid; ValueError otherwise."""
        text = text.strip()
        if text.isdigit():
            return cls(int(text))
        d = json.loads(text)
        return cls(int(d["pid"]), None if d.get("start") is None else int(d["start"]))


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None when there is no such process (or only
    its zombie, an exited process its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def command_line(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def this_process() -> ProcessRecord:
    return ProcessRecord(os.getpid(), start_ticks(os.getpid()))


def is_alive(record: ProcessRecord) -> bool:
    """The recorded process still runs (same pid and, where recorded, the same start time)."""
    start = start_ticks(record.pid)
    return start is not None and (record.start is None or start == record.start)
