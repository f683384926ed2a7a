"""Peak resident memory of processes, sampled in a background thread (psutil).

Used by the benchmarks to report the memory of the Ray workers a stage ran in (RSS
counts the object-store pages a worker touched, so it bounds what a node needs).
Beside RSS, each process's *private* peak: RSS less its resident shared pages
(``/proc/PID/statm``'s third field: mapped files such as torch's libraries, and the
object store's shared memory), i.e. the anonymous memory the process itself allocated.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import psutil


def ray_workers() -> list[psutil.Process]:
    """This driver's Ray worker processes (descendants named ``ray::...``)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ray::") or "default_worker.py" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


class PeakRss:
    """Peak RSS (bytes) of the processes ``select()`` returns while the block runs.

    ``peak_one``: the largest single process; ``peak_sum``: the largest total of one
    sample; ``matching(word)``: the peaks of the processes whose command line ever
    contained ``word`` (e.g. an actor class name), largest first; ``private``: each
    process's peak of RSS less its resident shared pages (bytes, by pid).
    """

    def __init__(self, select: Callable[[], Iterable[psutil.Process]] = ray_workers,
                 period: float = 0.1):
        self.select, self.period = select, period
        self.peak: dict[int, int] = {}
        self.private: dict[int, int] = {}
        self.names: dict[int, set[str]] = {}
        self.peak_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self.select():
                try:
                    mem, cmd = p.memory_info(), " ".join(p.cmdline())
                except psutil.Error:
                    continue
                total += mem.rss
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), mem.rss)
                own = mem.rss - getattr(mem, "shared", 0)  # ``shared``: Linux only
                self.private[p.pid] = max(self.private.get(p.pid, 0), own)
                self.names.setdefault(p.pid, set()).add(cmd.split(" ")[0])
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(self.period)

    @property
    def peak_one(self) -> int:
        return max(self.peak.values(), default=0)

    def largest(self, n: int) -> list[tuple[int, list[str]]]:
        """The ``n`` largest processes: (peak bytes, every name each ran as), largest first."""
        top = sorted(self.peak, key=self.peak.get, reverse=True)[:n]
        return [(self.peak[p], sorted(self.names[p])) for p in top]

    def matching(self, word: str, private: bool = False) -> list[int]:
        """Peak bytes (RSS, or ``private``) of the processes that ran as ``word``, largest first."""
        peaks = self.private if private else self.peak
        return sorted((peaks[p] for p, names in self.names.items() if any(word in n for n in names)),
                      reverse=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
