"""``forge-ray add-items``: SIDs for new items as a new version of an existing SID table.

    add_items(SIDS_DIR, NEW_DATASET, OUT)  ->  OUT = SIDS_DIR's rows + one row per new item

The table's own quantizer (its manifest's ``model``) encodes the new items' embeddings
and ranks last-level candidates; :func:`~forge_ray.core.sid.cold_start.place_new_items`
places them against the items already in the table under the table's collision rule,
so the codebook sizes (the GR model's vocabulary) do not change and a
:class:`~forge_ray.serving.recommender.Recommender` can answer with them at once
(``Recommender.from_dir(GR_DIR, sids=OUT)`` or ``rec.use_sids(OUT)``), no retraining.

OUT holds the parent's Parquet parts (hard links when the filesystem allows, else
copies: parts are never modified), one new part, the exports of the whole table and a
manifest with ``parent``, ``version`` (parent's + 1), ``datasets`` (every dataset
whose items are in the table) and the counts. Exactly once: new item ids that are
already in the table are refused, and rows = parent rows + new items is checked.

Runs in one process (no Ray): new items are encoded in batches of ``batch_size``;
memory is O(new items x (L + candidates)) plus the parent's rows under the new
items' prefixes; the parent table is streamed one Parquet part at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forge_ray.core.arrays import has_duplicates, sorted_unique
from forge_ray.core.quantize.registry import load_quantizer, quantizer_dim
from forge_ray.core.sid.codes import pack_codes
from forge_ray.core.sid.cold_start import place_new_items
from forge_ray.data.schema import DATASET_KIND, embeddings_to_numpy
from forge_ray.errors import InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest
from forge_ray.sid_table import EXPORTS, SIDS_KIND, SidTable, codes_array, export_paths, write_exports

def _new_items(dataset: Path, quantizer, k: int, batch_size: int):
    """(n,) ids, (n, Lq) codes, (n, k) candidates of the dataset's items."""
    files = sorted((dataset / "items").glob("*.parquet"))
    if not files:
        raise InputError(dataset, "dataset has no items/ Parquet files")
    ids, codes, cands = [], [], []
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["item_id", "embedding"]):
            x = embeddings_to_numpy(batch.column("embedding"))
            c, cand = quantizer.rank_last_level(x, k)
            ids.append(batch.column("item_id").to_numpy().astype(np.int64))
            codes.append(c)
            cands.append(cand)
    if not ids:
        raise InputError(dataset, "dataset has no items")
    return np.concatenate(ids), np.concatenate(codes), np.concatenate(cands)


def add_items(sids_dir: str | os.PathLike, dataset: str | os.PathLike, out: str | os.PathLike,
              overwrite: bool = False, batch_size: int = 65536) -> dict:
    """Write OUT, a new version of ``sids_dir`` that also holds ``dataset``'s items; returns its manifest."""
    parent, dataset = SidTable.open(sids_dir), Path(dataset)
    data_manifest = read_manifest(dataset, DATASET_KIND)
    if parent.quantizer_dir is None or not parent.quantizer_dir.is_dir():
        raise InputError(parent.path, f"the quantizer it was made with ({parent.quantizer_dir}) is not there")
    quantizer = load_quantizer(parent.quantizer_dir)
    dim, ddim = quantizer_dim(quantizer), int(data_manifest.get("embedding_dim") or 0)
    if dim != ddim:
        raise InputError(dataset, f"items have {ddim or 'no'}-d embeddings but the table's quantizer "
                                  f"expects {dim}-d (run forge-ray embed with the same model)")
    coll = parent.manifest.get("collisions") or {}
    code_sizes = list(parent.code_sizes)
    k = min(int(coll.get("candidates", 200)), code_sizes[-1])
    ids, codes, cand = _new_items(dataset, quantizer, k, batch_size)
    if has_duplicates(ids):
        raise InputError(dataset, "duplicate item ids among the new items")
    existing = _existing_under_prefixes(parent, ids, codes[:, :-1], code_sizes[:-1])
    try:
        placed = place_new_items(ids, codes, cand, existing, parent.strategy, parent.sizes,
                                 cap=int(coll.get("cap", 5)), seed=int(coll.get("seed", 0)))
    except ValueError as e:
        raise InputError(parent.path, f"cannot place the new items: {e}") from None
    return _write(parent, dataset, Path(out), overwrite, ids, codes, placed)


def _existing_under_prefixes(parent: SidTable, new_ids: np.ndarray, prefixes: np.ndarray,
                             prefix_sizes: list[int]) -> np.ndarray:
    """(m, L) SIDs of the parent's items under any new item's prefix; refuses new ids
    the parent already holds (one Parquet part in memory at a time)."""
    wanted = sorted_unique(pack_codes(prefixes, prefix_sizes)) if prefix_sizes else None
    found, clash = [], []
    sorted_new = np.sort(new_ids)
    for _, ids, sids in parent.iter_arrays():
        clash.extend(ids[np.isin(ids, sorted_new, assume_unique=False)][:3].tolist())
        if wanted is None:
            found.append(sids)
        else:
            keys = pack_codes(sids[:, : len(prefix_sizes)], prefix_sizes)
            found.append(sids[np.isin(keys, wanted)])
    if clash:
        raise InputError(parent.path, f"already holds new item ids {clash[:3]}: add-items adds new items only")
    return np.concatenate(found) if found else np.zeros((0, parent.n_levels), np.int64)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links: a copy is as good
        shutil.copy2(src, dst)


def _write(parent: SidTable, dataset: Path, out: Path, overwrite: bool, ids: np.ndarray,
           codes: np.ndarray, placed) -> dict:
    sizes = list(parent.sizes)
    with atomic_dir(out, overwrite, kind=SIDS_KIND, inputs=[parent.path, dataset]) as tmp:
        files = parent.files
        for i, src in enumerate(files):
            _link_or_copy(src, tmp / f"part-{i:05d}.parquet")
            old = _parent_exports(parent, i, src)
            if old is None:  # the parent was made without exports
                write_exports(tmp, i, *parent.read_part(src), sizes)
            for o, n in zip(old or (), export_paths(tmp, i)):
                n.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(o, n)
        new_index = len(files)
        pq.write_table(pa.table({
            "item_id": ids, "codes": codes_array(codes), "sid": codes_array(placed.sids),
            "fallback": placed.fallback}), tmp / f"part-{new_index:05d}.parquet", compression="zstd")
        write_exports(tmp, new_index, ids, placed.sids, sizes)
        table_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in tmp.glob("*.parquet"))
        if table_rows != parent.n_items + len(ids):
            raise InputError(out, f"wrote {table_rows} rows, expected {parent.n_items} + {len(ids)}")
        counts = {"input_items": int(parent.manifest.get("counts", {}).get("input_items", parent.n_items))
                  + len(ids), "items": table_rows, "distinct_items": table_rows, "added": len(ids)}
        keep = {k: v for k, v in parent.manifest.items() if k not in ("kind", "created", "code_version")}
        moved = int((placed.sids[:, : codes.shape[1]] != codes).any(axis=1).sum())
        return write_manifest(
            tmp, SIDS_KIND, **{**keep, "model": os.fspath(parent.quantizer_dir),
                               "datasets": [os.fspath(d) for d in parent.datasets] + [os.fspath(dataset.resolve())],
                               "parent": os.fspath(parent.path.resolve()), "version": parent.version + 1,
                               "counts": counts, "exports": {**EXPORTS, "rows": table_rows},
                               "added": {"items": len(ids), "moved": moved,
                                         "fallback": int(placed.fallback.sum())}})


def _parent_exports(parent: SidTable, index: int, part: Path) -> tuple[Path, Path] | None:
    """The parent's export files of one part: named by index, or (older tables) by the part's stem."""
    for paths in (export_paths(parent.path, index),
                  (parent.path / "export" / "sid_table" / f"{part.stem}.csv",
                   parent.path / "export" / "sid_tokens" / f"{part.stem}.csv")):
        if all(p.is_file() for p in paths):
            return paths
    return None
