"""Item -> SID exports, written a batch at a time.

* :class:`SidTableWriter`: FORGE's item-to-SID table consumed by its HitRate script,
  CSV ``item_id,c1,c2,c3`` (one column per level; per-level codes in
  ``[0, sizes[l])``, or global token numbers with ``tokens=True``).
* :class:`SidTokenWriter`: CSV ``item_id,sid`` with SID token strings
  ``C{c + offset_l}`` (see :mod:`forge_ray.core.sid.codes`).

Both accept numpy arrays or Arrow tables/record batches (columns ``item_id`` and
either ``codes`` as a list column or ``c1..cL``) and append; memory is one batch.
The readers validate and raise :class:`~forge_ray.errors.InputError` naming the file.
Write into an :func:`~forge_ray.io.atomic_dir` so a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from forge_ray.core.sid.codes import check_codes, codes_to_tokens, level_offsets, parse_sid_sequence
from forge_ray.errors import InputError


def level_columns(n_levels: int) -> list[str]:
    return [f"c{i + 1}" for i in range(n_levels)]


def batch_arrays(batch, n_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow table / record batch -> (item_ids (n,), codes (n, L)) int64."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    ids = batch.column("item_id").to_numpy().astype(np.int64)
    if "codes" in batch.column_names:
        col = batch.column("codes").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        codes = flat.reshape(len(col), -1) if len(col) else np.zeros((0, n_levels), np.int64)
    else:
        codes = np.stack([batch.column(c).to_numpy().astype(np.int64)
                          for c in level_columns(n_levels)], axis=1)
    return ids, codes


class _CsvWriter:
    def __init__(self, path: str | os.PathLike, sizes: Sequence[int], schema: pa.Schema):
        self.path = os.fspath(path)
        self.sizes = [int(s) for s in sizes]
        self.rows = 0
        # Plain ``item_id,c1,c2,c3`` lines: nothing we write (ints, C-tokens) needs quotes.
        plain = pacsv.WriteOptions(quoting_style="none", quoting_header="none")
        self._writer = pacsv.CSVWriter(self.path, schema, write_options=plain)

    def write(self, item_ids_or_batch, codes: np.ndarray | None = None) -> None:
        """Append ``(item_ids (n,), codes (n, L))`` or one Arrow table / record batch."""
        if codes is None:
            ids, codes = batch_arrays(item_ids_or_batch, len(self.sizes))
        else:
            ids = np.asarray(item_ids_or_batch, dtype=np.int64)
            codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape != (ids.shape[0], len(self.sizes)):
            raise ValueError(f"codes {codes.shape} do not match {ids.shape[0]} items x "
                             f"{len(self.sizes)} levels")
        self._writer.write_table(self._table(ids, codes))
        self.rows += ids.shape[0]

    def close(self) -> int:
        """Finish the file; returns the number of rows written."""
        self._writer.close()
        return self.rows

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class SidTableWriter(_CsvWriter):
    """CSV ``item_id,c1,...,cL``: per-level codes, or token numbers when ``tokens``."""

    def __init__(self, path: str | os.PathLike, sizes: Sequence[int], tokens: bool = False):
        self.tokens = tokens
        fields = [("item_id", pa.int64())] + [(c, pa.int64()) for c in level_columns(len(sizes))]
        super().__init__(path, sizes, pa.schema(fields))

    def _table(self, ids, codes):
        values = codes_to_tokens(codes, self.sizes) if self.tokens else check_codes(codes, self.sizes)
        names = level_columns(len(self.sizes))
        return pa.table({"item_id": ids} | {c: values[:, i] for i, c in enumerate(names)})


class SidTokenWriter(_CsvWriter):
    """CSV ``item_id,sid`` with SIDs as token strings (``C1442C14117C19114``)."""

    def __init__(self, path: str | os.PathLike, sizes: Sequence[int]):
        super().__init__(path, sizes, pa.schema([("item_id", pa.int64()), ("sid", pa.string())]))

    def _table(self, ids, codes):
        # Arrow builds the strings (what sid_strings gives, ~10x faster than Python):
        # "" + "C" + t1 + "C" + t2 ... with "C" as the separator.
        tokens = codes_to_tokens(codes, self.sizes)
        text = [pa.array(tokens[:, i]).cast(pa.string()) for i in range(tokens.shape[1])]
        return pa.table({"item_id": ids, "sid": pc.binary_join_element_wise(pa.scalar(""), *text, "C")})


def read_sid_table(path: str | os.PathLike, sizes: Sequence[int],
                   tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a :class:`SidTableWriter` file -> (item_ids (N,), codes (N, L)) int64."""
    names = ["item_id"] + level_columns(len(sizes))
    table = _read_csv(path, names, {n: pa.int64() for n in names})
    ids = table.column("item_id").to_numpy()
    values = np.stack([table.column(c).to_numpy() for c in names[1:]], axis=1)
    if tokens:
        values = values - level_offsets(sizes)[None, :]
    try:
        return ids, check_codes(values, sizes)
    except ValueError as e:
        raise InputError(path, str(e)) from None


def read_sid_tokens(path: str | os.PathLike, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Read a :class:`SidTokenWriter` file -> (item_ids (N,), codes (N, L)) int64."""
    table = _read_csv(path, ["item_id", "sid"], {"item_id": pa.int64(), "sid": pa.string()})
    ids = table.column("item_id").to_numpy()
    codes = np.zeros((len(ids), len(sizes)), dtype=np.int64)
    for i, text in enumerate(table.column("sid").to_pylist()):
        try:
            one = parse_sid_sequence(text or "", sizes)
        except ValueError as e:
            raise InputError(path, f"row {i + 1}: {e}") from None
        if one.shape[0] != 1:
            raise InputError(path, f"row {i + 1}: expected one SID of {len(sizes)} tokens")
        codes[i] = one[0]
    return ids, codes


def _read_csv(path, names: list[str], types: dict) -> pa.Table:
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except pa.ArrowInvalid as e:
        raise InputError(path, f"not a valid SID table: {str(e).splitlines()[0]}") from None
    if table.column_names != names:
        raise InputError(path, f"header is {','.join(table.column_names)}, expected {','.join(names)}")
    return table
