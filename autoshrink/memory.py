"""What memory the system has free and what this process holds, from Linux's /proc files.

No torch here: the ``search`` command asks before it loads it (``autoshrink.standby``).
"""

from __future__ import annotations


def available_memory() -> int | None:
    """Bytes the system can give new processes without swapping (Linux's MemAvailable), or
    None where it does not say."""
    return _kibibytes_in("/proc/meminfo", "MemAvailable")


def private_memory(pid: int | str = "self") -> int | None:
    """Bytes of memory a process (default: this one) holds for itself (Linux's RssAnon: its
    data, models and heap, not the libraries it shares with other processes), or None where it
    does not say."""
    return _kibibytes_in(f"/proc/{pid}/status", "RssAnon")


def unshared_memory(pid: int | str = "self") -> int | None:
    """Bytes of memory only this process holds (Linux's Private_Dirty: pages it has written that
    no other process maps; unlike RssAnon, without what a forked process still shares with its
    parent), or None where the system does not say."""
    return _kibibytes_in(f"/proc/{pid}/smaps_rollup", "Private_Dirty")


def _kibibytes_in(path: str, field: str) -> int | None:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
