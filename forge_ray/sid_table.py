"""A SID table (the output of ``forge-ray assign`` or ``forge-ray add-items``), opened once.

A SIDS_DIR holds Parquet parts with ``item_id`` int64, ``codes`` list<int64> (the
quantizer's raw codes), ``sid`` list<int64> (the final SID, suffix level included)
and ``fallback`` bool, plus ``manifest.json`` (kind ``sids``: ``sizes`` per SID
level, the quantizer ``model`` and the ``dataset`` the items came from; a table made
by ``add-items`` also names its ``parent`` table, its ``version`` and every dataset
its items came from in ``datasets``).

:class:`SidTable` reads the manifest once and loads arrays only when asked, one
Parquet file at a time (memory: 8 x (1 + L) bytes per item for :meth:`arrays`). It
imports no Ray, so the recommender and unit tests use it directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from forge_ray.core.sid.codes import pack_codes
from forge_ray.core.sid.export import SidTableWriter, SidTokenWriter
from forge_ray.core.sid.metrics import distinct_counts, split_by_bucket, sum_histograms
from forge_ray.errors import InputError
from forge_ray.io import manifest_path, read_manifest

SIDS_KIND = "sids"
# export/<name>/part-<i>.csv holds the rows of the i-th Parquet part (sorted order)
EXPORTS = {"sid_table": "export/sid_table/part-*.csv (item_id,c1..cL)",
           "sid_tokens": "export/sid_tokens/part-*.csv (item_id,sid)"}


@dataclass
class SidTable:
    """Handle on one SIDS_DIR: manifest, sizes, files; arrays on demand."""

    path: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, sids_dir: str | os.PathLike) -> "SidTable":
        """Read and check the manifest; InputError naming the folder when it is not a SID table."""
        path = Path(sids_dir)
        manifest = read_manifest(path, SIDS_KIND)
        sizes = manifest.get("sizes")
        if not isinstance(sizes, list) or not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise InputError(path, f"manifest.json 'sizes' is {sizes!r}, expected a list of positive ints")
        return cls(path, manifest)

    # ---- what the manifest says ------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        """Codebook size per SID level (a suffix level included)."""
        return tuple(self.manifest["sizes"])

    @property
    def n_levels(self) -> int:
        return len(self.sizes)

    @property
    def code_sizes(self) -> tuple[int, ...]:
        """Codebook sizes of the quantizer's own levels (no suffix level)."""
        return tuple(self.manifest.get("code_sizes") or self.sizes)

    @property
    def strategy(self) -> str:
        return str(self.manifest.get("strategy", "none"))

    @property
    def version(self) -> int:
        """1 for a table made by ``assign``; parent's + 1 for one made by ``add-items``."""
        return int(self.manifest.get("version", 1))

    def _path_field(self, value: str | None) -> Path | None:
        """A path recorded in the manifest: relative ones are relative to this table."""
        return manifest_path(self.path, value)

    @property
    def quantizer_dir(self) -> Path | None:
        return self._path_field(self.manifest.get("model"))

    @property
    def datasets(self) -> list[Path]:
        """The datasets whose items are in the table (the first is ``assign``'s input)."""
        listed = self.manifest.get("datasets") or [self.manifest.get("dataset")]
        return [p for p in (self._path_field(v) for v in listed) if p is not None]

    @property
    def files(self) -> list[Path]:
        return [Path(p) for p in sid_files(self.path)]

    @cached_property
    def n_items(self) -> int:
        """Rows, from the Parquet footers (no data read)."""
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)

    @property
    def table_bytes(self) -> int:
        """Memory of the in-process item -> SID arrays (:meth:`arrays`)."""
        return self.n_items * 8 * (1 + self.n_levels)

    # ---- data --------------------------------------------------------------------------
    def read_part(self, path: Path, column: str = "sid") -> tuple[np.ndarray, np.ndarray]:
        """One Parquet part -> ((n,) int64 item ids, (n, W) int64 ``column`` codes).

        W is ``n_levels`` for ``sid`` and ``len(code_sizes)`` for ``codes``; a row of
        another length is an InputError naming the file.
        """
        width = self.n_levels if column == "sid" else len(self.code_sizes)
        t = pq.read_table(path, columns=["item_id", column])
        return t["item_id"].to_numpy().astype(np.int64), part_codes(path, t, column, width)

    def iter_arrays(self, column: str = "sid") -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
        """Per Parquet part: (file, item ids, codes) as :meth:`read_part` gives them."""
        for path in self.files:
            yield path, *self.read_part(path, column)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole table in this process: ((N,) item ids, (N, L) SID codes)."""
        ids, codes = [], []
        for _, i, c in self.iter_arrays():
            ids.append(i)
            codes.append(c)
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.n_levels), np.int64)
        return np.concatenate(ids), np.concatenate(codes)

    def item_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """((M,) item ids, (M,) object str keys) of the items of every listed dataset.

        The key is the source's own id (``item_key``: an ASIN, a FORGE item id) where
        the dataset kept one, else the item id as text. Reads two columns only.
        """
        ids, keys = [], []
        for ds in self.datasets:
            files = sorted((ds / "items").glob("*.parquet"))
            if not files:
                raise InputError(ds, "dataset named by the SID table has no items/ Parquet files")
            for path in files:
                names = pq.ParquetFile(path).schema_arrow.names
                t = pq.read_table(path, columns=[c for c in ("item_id", "item_key") if c in names])
                i = t["item_id"].to_numpy().astype(np.int64)
                k = (t["item_key"].to_numpy(zero_copy_only=False) if "item_key" in names
                     else pa.array(i).cast(pa.string()).to_numpy(zero_copy_only=False))
                ids.append(i)
                keys.append(k.astype(object))
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, object)
        return np.concatenate(ids), np.concatenate(keys)


def list_codes(col: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A list<int64> column of equal-length rows -> (n, width) int64 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if flat.size != len(col) * width:
        raise ValueError(f"expected {width} codes per row")
    return flat.reshape(len(col), width)


def part_codes(path: str | os.PathLike, table: pa.Table, column: str, width: int) -> np.ndarray:
    """The list<int64> ``column`` of a Parquet part's ``table`` -> (n, width) int64;
    a row of another length is an InputError naming the file ``path``."""
    col = table[column].combine_chunks()
    if len(col) and pc.any(pc.not_equal(pc.list_value_length(col), width)).as_py():
        raise InputError(path, f"a {column!r} row does not have {width} levels")
    return col.flatten().to_numpy().reshape(-1, width).astype(np.int64)


def key_pieces(paths: list[str], sizes: list[int], suffix: bool, parts: int) -> tuple:
    """SID table Parquet parts -> the map side of ``sid-metrics``' counts.

    Returns ``parts`` bucket tuples and then the code usage: bucket b holds, per kind
    (item id; raw SID, the packed ``codes``; final SID, the packed first L levels of
    ``sid`` and, with a ``suffix`` level, that level as a second key row), the
    (w + 1, m) :func:`~forge_ray.core.sid.metrics.distinct_counts` of the keys in
    bucket b; the usage is ``{1: codes, 2: sid}``, per level (suffix level included)
    the (size,) count of items per code. ``sizes``: the L code sizes. Memory: the
    parts' three columns plus 32 bytes per row.
    """
    n_levels = len(sizes)
    ids, raw, final, usage = [], [], [], {1: [], 2: []}
    for path in paths:
        t = pq.read_table(path, columns=["item_id", "codes", "sid"])
        codes = part_codes(path, t, "codes", n_levels)
        sid = part_codes(path, t, "sid", n_levels + suffix)
        try:
            raw.append(pack_codes(codes, sizes)[None])
            final.append(np.vstack([pack_codes(sid[:, :n_levels], sizes)[None], sid[:, n_levels:].T]))
        except ValueError as e:
            raise InputError(path, str(e)) from None
        if suffix and len(sid) and sid[:, -1].min() < 0:
            raise InputError(path, "a negative SID suffix")
        ids.append(t["item_id"].to_numpy().astype(np.int64)[None])
        for kind, c in ((1, codes), (2, sid)):
            usage[kind].append([np.bincount(c[:, lvl], minlength=sizes[lvl] if lvl < n_levels else 1)
                                for lvl in range(c.shape[1])])
    buckets = [split_by_bucket(distinct_counts(np.hstack(keys)), parts) for keys in (ids, raw, final)]
    levels = {kind: [sum_histograms(per_level) for per_level in zip(*files)] for kind, files in usage.items()}
    return (*zip(*buckets), levels)


def sid_files(sids_dir: str | os.PathLike) -> list[str]:
    """The Parquet parts of a SID table folder, sorted (also before its manifest exists)."""
    files = sorted(str(p) for p in Path(sids_dir).glob("*.parquet"))
    if not files:
        raise InputError(sids_dir, "SID table has no Parquet files")
    return files


def codes_array(codes: np.ndarray) -> pa.ListArray:
    """(n, L) int64 -> Arrow list<int64> column (the ``codes`` / ``sid`` columns)."""
    n, width = codes.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(codes, dtype=np.int64).reshape(-1)))


def export_paths(folder: str | os.PathLike, index: int) -> tuple[Path, Path]:
    """(sid_table CSV, sid_tokens CSV) of the ``index``-th Parquet part of a SID table."""
    name = f"part-{index:05d}.csv"
    return Path(folder, "export", "sid_table", name), Path(folder, "export", "sid_tokens", name)


def write_exports(folder: str | os.PathLike, index: int, item_ids: np.ndarray, sids: np.ndarray,
                  sizes: list[int]) -> None:
    """Write part ``index`` of both exports (FORGE's ``item_id,c1..cL`` and token strings)."""
    for path, writer in zip(export_paths(folder, index), (SidTableWriter, SidTokenWriter)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with writer(path, sizes) as w:
            w.write(item_ids, sids)
