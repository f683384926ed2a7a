"""What every reader of :mod:`forge_ray.data` shares: the unit of work and its result,
and the line / row helpers the text and array readers use.

Kept apart from :mod:`forge_ray.data.sources` (which dispatches to the readers) so the
readers import this module and nothing imports back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Chunk:
    """One unit of reading work (small and picklable: it is sent to a Ray task)."""

    path: str            # the source file (the folder for amazon / parquet folders)
    fmt: str             # one of FORMATS
    table: str           # one of TABLES
    start: int           # [start, stop): rows, bytes or row groups (module doc)
    stop: int
    member: str = ""     # npz member, or Parquet file under ``path``
    sid_sizes: tuple[int, ...] = ()  # AL-GR only: codebook size per SID level


@dataclass
class ReadResult:
    """A chunk's canonical rows and what was dropped from it (reason -> count)."""

    table: pa.Table
    dropped: dict[str, int] = field(default_factory=dict)


def finite_rows(emb: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of an (N, D) embedding with no NaN/Inf."""
    return np.isfinite(emb).all(axis=1) if emb.size else np.ones(len(emb), dtype=bool)


def text_splits(path: str, approx_rows: int, data_start: int = 0,
                sample_lines: int = 256) -> list[tuple[int, int]]:
    """Byte ranges ``[start, stop)`` of about ``approx_rows`` lines each, from a sample.

    The average line length is estimated from the first ``sample_lines`` lines after
    ``data_start`` (no full scan). Readers align each range to line starts.
    """
    size = os.path.getsize(path)
    if size <= data_start:
        return []
    with open(path, "rb") as f:
        f.seek(data_start)
        lines = [f.readline() for _ in range(sample_lines)]
    lines = [ln for ln in lines if ln]
    avg = max(1, sum(map(len, lines)) // max(1, len(lines)))
    step = max(1, approx_rows * avg)
    return [(s, min(size, s + step)) for s in range(data_start, size, step)]


def read_lines(path: str, start: int, stop: int) -> list[tuple[int, bytes]]:
    """``(offset, line)`` for every line whose first byte lies in ``[start, stop)``.

    A line starts at ``start`` only when ``start`` is 0 or follows a newline; lines
    keep no trailing newline. Memory: the chunk's bytes plus one line.
    """
    out: list[tuple[int, bytes]] = []
    with open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                pos = start + len(f.readline())  # finish the line that began earlier
        f.seek(pos)
        while pos < stop:
            line = f.readline()
            if not line:
                break
            out.append((pos, line.rstrip(b"\r\n")))
            pos += len(line)
    return out
