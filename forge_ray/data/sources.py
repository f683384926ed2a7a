"""Input formats -> canonical tables, one small chunk of reading work at a time.

The reader contract that ``forge_ray.distributed.ingest`` runs on Ray:

1. :func:`detect` names the format of a path (see ``FORMATS``).
2. :func:`plan` validates headers/members up front (missing members, length
   mismatches, corrupt archives -> one-line :class:`InputError` naming the file) and
   splits the source into :class:`~forge_ray.data.chunks.Chunk` s: small, picklable
   units of reading work (the readers share :mod:`forge_ray.data.chunks`).
3. :func:`read_chunk` (in a Ray task) turns one chunk into a canonical Arrow table
   (schemas in :mod:`forge_ray.data.schema`) plus per-reason drop counts. Per-chunk
   checks (NaN/Inf embeddings, malformed lines) live here; ``strict=True`` turns a
   drop into an InputError. Global checks (duplicate ids across chunks, pairs naming
   unknown items) are the caller's: see :func:`duplicates` / :func:`unknown`.

What ``Chunk.start``/``stop`` count, by format:

=========================  ====================================================
forge_*_npz                rows of the npz member named by ``member``
algr_tsv, amazon, csv      BYTES of the text file: a chunk owns every line whose
                           first byte lies in ``[start, stop)`` (Hadoop-style splits,
                           so planning never scans a huge file)
parquet / interactions     ROW GROUPS ``[start, stop)`` of the Parquet file ``member``
=========================  ====================================================

Tables: ``items``, ``pairs``, ``sequences`` (canonical), ``interactions`` (raw logs:
``user_id, item_id, timestamp`` int64 seconds, grouped into sequences by the caller),
``sids`` (AL-GR: ``item_id, codes list<int64>``, the SID behind each synthetic id;
may repeat across chunks, identical per id) and ``targets`` (AL-GR test files:
``user_id, item_ids``: the raw, non-SID item ids of each row's answer). Sequences from
AL-GR and Amazon carry an extra ``user_key`` string column (the source's own user id).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from forge_ray.core.arrays import sorted_unique
from forge_ray.data.chunks import Chunk, ReadResult
from forge_ray.errors import InputError

FORMATS = ("forge_contrastive_npz", "forge_reconstruct_npz", "algr_tsv", "amazon",
           "parquet", "interactions")
TABLES = ("items", "pairs", "sequences", "interactions", "sids", "targets")
DEFAULT_SID_SIZES = (8192, 8192, 8192)

# format -> module under forge_ray.data that implements plan/read/info for it
_MODULES = {
    "forge_contrastive_npz": "forge_npz",
    "forge_reconstruct_npz": "forge_npz",
    "algr_tsv": "algr",
    "amazon": "amazon",
    "parquet": "parquet_in",
    "interactions": "interactions",
}


def _module(fmt: str, path: str | None = None):
    """The reader of ``fmt``; interaction logs given as Parquet go to the Parquet reader."""
    if fmt not in _MODULES:
        raise InputError(fmt, f"unknown input format; known: {', '.join(FORMATS)}")
    if fmt == "interactions" and path is not None:
        from forge_ray.data import parquet_in

        if parquet_in.is_parquet(path):
            return parquet_in
    return importlib.import_module(f"forge_ray.data.{_MODULES[fmt]}")


def detect(path: str | os.PathLike) -> str:
    """The format of ``path`` (one of FORMATS), from names, members and headers."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "input not found")
    if p.is_dir():
        if (p / "user_sequence.txt").is_file():
            return "amazon"
        from forge_ray.data import parquet_in

        return parquet_in.detect(p)
    with open(p, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"PK\x03\x04" or p.suffix == ".npz":
        from forge_ray.data import forge_npz

        return forge_npz.detect(p)
    if head[:4] == b"PAR1":
        from forge_ray.data import parquet_in

        return parquet_in.detect(p)
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if first.split("\t")[:4] == ["id", "system", "user", "answer"]:
        return "algr_tsv"
    from forge_ray.data import interactions

    if interactions.csv_columns(first) is not None:
        return "interactions"
    raise InputError(p, "unrecognised input (expected a FORGE npz, an AL-GR tsv with header "
                        "'id system user answer', an Amazon folder with user_sequence.txt, "
                        "Parquet, or an interactions CSV with user/item/timestamp columns)")


def amazon_files_as_folders(paths: list[str]) -> list[str]:
    """``paths`` with an Amazon folder's two files, named together, replaced by that folder.

    ``ingest .../user_sequence.txt .../item_text.txt`` is how a user names the dataset;
    the reader takes their folder (in the place of the first of the two). One of the
    two named without the other is refused: the reader needs both.
    """
    from forge_ray.data.amazon import ITEMS_FILE, SEQUENCES_FILE

    pair = {ITEMS_FILE, SEQUENCES_FILE}
    named: dict[str, set[str]] = {}
    for p in paths:
        if Path(p).name in pair and Path(p).is_file():
            named.setdefault(os.fspath(Path(p).parent), set()).add(Path(p).name)
    out: list[str] = []
    for p in paths:
        folder = os.fspath(Path(p).parent)
        if folder not in named or Path(p).name not in pair:
            out.append(p)
        elif named[folder] != pair:
            raise InputError(p, f"an Amazon dataset is {SEQUENCES_FILE} and {ITEMS_FILE} together: "
                                "name both files (or their folder)")
        elif folder not in out:
            out.append(folder)
    return out


def plan(path: str | os.PathLike, fmt: str | None = None, chunk_rows: int = 65_536,
         sid_sizes: tuple[int, ...] = DEFAULT_SID_SIZES) -> list[Chunk]:
    """Validate ``path`` and split it into chunks of about ``chunk_rows`` rows each.

    ``sid_sizes`` (AL-GR only) are the codebook sizes used to parse SID tokens and
    to pack each SID into a synthetic int64 item id.
    """
    if chunk_rows <= 0:
        raise InputError("chunk_rows", f"must be positive, got {chunk_rows}")
    path = os.fspath(path)
    fmt = fmt or detect(path)
    mod = _module(fmt, path)
    if fmt == "algr_tsv":
        return mod.plan(path, chunk_rows, tuple(int(s) for s in sid_sizes))
    if fmt.startswith("forge_"):
        return mod.plan(path, fmt, chunk_rows)
    return mod.plan(path, chunk_rows, fmt=fmt) if mod.__name__.endswith("parquet_in") else mod.plan(path, chunk_rows)


def read_chunk(chunk: Chunk, strict: bool = False, **options) -> ReadResult:
    """Read one chunk into its canonical table.

    ``strict`` refuses (InputError naming the file) what would otherwise be dropped
    and counted. ``options`` are format-specific; ``row_ids`` (contrastive npz: the
    row -> item id array from :func:`forge_ray.data.forge_npz.row_item_ids`, e.g.
    shared through the Ray object store) saves each worker from unpickling itemEncID.
    """
    return _module(chunk.fmt, chunk.path).read(chunk, strict=strict, **options)


def source_info(path: str | os.PathLike, fmt: str | None = None) -> dict:
    """Small facts for a manifest: format, embedding dim/dtype, row counts per table."""
    path = os.fspath(path)
    fmt = fmt or detect(path)
    return {"path": path, "format": fmt, **_module(fmt, path).info(path, fmt)}


# ----------------------------------------------------------------- global-check helpers

def duplicates(ids: np.ndarray) -> np.ndarray:
    """The distinct values that occur more than once in ``ids`` (sorted)."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    dup = ids[1:][ids[1:] == ids[:-1]]
    return sorted_unique(dup)


def unknown(ids: np.ndarray, known_sorted: np.ndarray) -> np.ndarray:
    """Boolean mask of ``ids`` absent from the sorted array ``known_sorted``."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(known_sorted) == 0:
        return np.ones(ids.shape, dtype=bool)
    pos = np.clip(np.searchsorted(known_sorted, ids), 0, len(known_sorted) - 1)
    return known_sorted[pos] != ids


