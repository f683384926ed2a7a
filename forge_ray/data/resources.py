"""Memory and disk this process may use, and refusing work that cannot fit.

Stages estimate what a run will allocate from its arguments and declared sizes
(before allocating anything) and call :func:`require_memory` / :func:`require_disk`,
which raise a one-line :class:`InputError` giving the estimate and what is
available, instead of being killed by the kernel (exit 137) halfway through.
Available memory is the smaller of ``MemAvailable`` (/proc/meminfo) and the
cgroup's remaining limit (containers), or ``os.sysconf`` where neither exists.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from forge_ray.errors import InputError


def available_memory() -> int | None:
    """Bytes this process can still allocate (None when the platform cannot say)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes",                 # v1
                         "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:  # v1 reports "no limit" as ~2**63
                found.append(int(cap) - int(Path(used).read_text()))
        except (OSError, ValueError):
            pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return max(0, min(found))


def human(n: float) -> str:
    """``n`` bytes as ``12.3 GiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_memory(need: int, source: str | os.PathLike | None, what: str, hint: str) -> None:
    """Refuse (InputError on ``source``) when ``need`` bytes exceed the available memory.

    ``what`` names the allocation ("synth --dim 1000000"), ``hint`` how to shrink it.
    """
    have = available_memory()
    if have is not None and need > have:
        raise InputError(source, f"{what} needs about {human(need)} of memory but only "
                                 f"{human(have)} is available; {hint}")


def require_disk(need: int, folder: str | os.PathLike, source: str | os.PathLike | None,
                 what: str, hint: str) -> None:
    """Refuse when ``need`` bytes exceed the free space of the filesystem holding
    ``folder`` (its nearest existing ancestor)."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if need > free:
        raise InputError(source, f"{what} writes at least {human(need)} but {path} has only "
                                 f"{human(free)} free; {hint}")
