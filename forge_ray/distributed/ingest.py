"""``forge-ray ingest``: many input files -> one canonical dataset, on Ray.

The driver only plans (format detection and header checks, see
:mod:`forge_ray.data.sources`) and collects small per-task summaries; it never holds
rows. The work runs in four phases inside the atomic temporary output folder:

1. **read** - one Ray task per planned chunk reads it, writes its own Parquet shards
   (``items/``, ``sequences/``, ``sids/`` directly; ``pairs`` and raw interactions to
   a staging area) and writes small *key files*, hash-partitioned into ``B``
   buckets: ``(item_id, source, chunk, row, row_hash)`` per item and the distinct
   item ids each pairs chunk names.
2. **check** - one task per bucket finds repeated item ids and the ids pairs name
   that no source defines. Memory per task: about ``28 * items / B`` bytes of
   keys plus ``8 * distinct pair ids / B``.
3. **fix** - items chunks holding redundant cross-source copies are rewritten
   without them, and staged pairs are filtered against the unknown ids (each task
   holds one chunk plus the unknown-id set).
4. **group** - raw interaction logs become time-ordered sequences with a Ray Data
   ``groupby(user_id).map_groups`` (a distributed shuffle: no process holds all
   users).

Policies (see docs/data.md): an item id repeated within one source is refused; one
present in several sources is kept once (first source on the command line wins) if
its embeddings (or, without embeddings, its key and text) are bit-identical, and
refused naming both files otherwise. Pairs naming unknown items are dropped and
counted, refused under ``strict``. Sources whose embedding dim/dtype or item columns
disagree are refused naming both files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from forge_ray import logs
from forge_ray.config import require
from forge_ray.core.arrays import sorted_unique
from forge_ray.core.sid.codes import bucket_of
from forge_ray.data import forge_npz, sources
from forge_ray.data.schema import DATASET_KIND, PAIRS_SCHEMA, ShardWriter
from forge_ray.distributed.dataset import group_interactions, parquet_rows
from forge_ray.errors import ForgeRayError, InputError
from forge_ray.io import atomic_dir, write_manifest

KEYS_PER_BUCKET = 2_000_000  # auto bucket count: ~56 MB of item keys per check task
_KEY_SCHEMA = pa.schema([("item_id", pa.int64()), ("src", pa.int32()), ("chunk", pa.int32()),
                         ("row", pa.int64()), ("h", pa.uint64())])
_REMOVE_SCHEMA = pa.schema([("chunk", pa.int32()), ("row", pa.int64())])
# tables keyed by item_id -> whether one source may repeat an id (identical rows only)
KEYED = {"items": False, "sids": True}


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Options of one ingest run.

    Attributes:
        strict: refuse instead of dropping-and-counting any bad row.
        chunk_rows: rows per read task (memory per task ~ chunk_rows * row bytes).
        buckets: hash buckets for the global checks; 0 picks one per 2M planned rows.
        progress: show progress bars (on a terminal only, see ``forge_ray.logs.bars``).
    """

    strict: bool = False
    chunk_rows: int = 65_536
    buckets: int = 0
    progress: bool = True

    def __post_init__(self):
        require(self.chunk_rows > 0, "chunk_rows must be positive")
        require(self.buckets >= 0, "buckets must be >= 0")


def ingest(paths: list[str], out: str | os.PathLike, cfg: IngestConfig | None = None, *,
           overwrite: bool = False, formats: list[str | None] | None = None) -> dict:
    """Ingest ``paths`` into the dataset folder ``out``; returns its manifest.

    Needs a Ray connection (see :func:`forge_ray.distributed.session.ray_session`)
    and an output location every worker can write (a shared filesystem on a real
    cluster). Raises :class:`InputError` (one line, no output left) on bad input.
    """
    cfg = cfg or IngestConfig()
    if not paths:
        raise InputError(None, "no input sources given")
    names = sources.amazon_files_as_folders([os.fspath(p) for p in paths])
    formats = formats or [None] * len(names)
    fmts = [f or sources.detect(p) for p, f in zip(names, formats)]
    plans = [sources.plan(p, f, cfg.chunk_rows) for p, f in zip(names, fmts)]
    infos = [sources.source_info(p, f) for p, f in zip(names, fmts)]
    _check_declared_dims(names, infos)
    chunks = [(s, ch) for s, plan in enumerate(plans) for ch in plan]
    # planned rows (from the headers; text formats plan byte ranges, so count chunks)
    rows = sum(sum(i.get("rows", {}).values()) or len(p) * cfg.chunk_rows
               for i, p in zip(infos, plans))
    buckets = cfg.buckets or max(1, math.ceil(rows / KEYS_PER_BUCKET))
    show = cfg.progress and logs.bars()

    with atomic_dir(out, overwrite=overwrite, kind=DATASET_KIND, inputs=names) as tmp:
        tmp = tmp.resolve()
        row_ids = {s: ray.put(forge_npz.row_item_ids(p)) for s, (p, f) in enumerate(zip(names, fmts))
                   if f == "forge_contrastive_npz"}
        read = _gather([_read_task.remote(ch, s, c, str(tmp), buckets, cfg.strict,
                                          row_ids.get(s) if ch.table == "items" else None)
                        for c, (s, ch) in enumerate(chunks)], "read", show)
        del row_ids
        item_cols = _check_item_columns(names, read)
        checked = _gather([_check_task.remote(str(tmp), b, names) for b in range(buckets)],
                          "check", show)
        fix = sorted({(t, c) for r in checked for t, cs in r["remove"].items() for c in cs})
        _gather([_drop_rows_task.remote(str(tmp), t, c) for t, c in fix], "merge", show)
        unknown = sum(r["unknown"] for r in checked)
        pair_chunks = [r for r in read if r["table"] == "pairs"]
        filtered = _gather([_filter_pairs_task.remote(str(tmp), r["prefix"], unknown > 0)
                            for r in pair_chunks], "pairs", show)
        unknown_drops = Counter()
        for r, f in zip(pair_chunks, filtered):
            if f["dropped"]:
                unknown_drops[r["src"]] += f["dropped"]
        if cfg.strict and unknown_drops:
            src, n = next(iter(unknown_drops.items()))
            raise InputError(names[src], f"{n} pairs name item ids that no source defines "
                                         f"(e.g. {_unknown_example(checked)}); without --strict "
                                         "they are dropped and counted")
        if (tmp / "stage" / "interactions").is_dir():
            group_interactions(str(tmp / "stage" / "interactions"), str(tmp / "sequences"))
        shutil.rmtree(tmp / "stage", ignore_errors=True)
        shutil.rmtree(tmp / "keys", ignore_errors=True)
        manifest = _manifest(tmp, names, fmts, infos, read, checked, unknown_drops,
                             item_cols, buckets, cfg)
    return manifest


def _unknown_example(checked: list[dict]) -> int | None:
    return next((r["example"] for r in checked if r["example"] is not None), None)


# ----------------------------------------------------------------------------- tasks

def _guarded(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Return a user error as data: the driver re-raises it as one clean line.

    (A raised InputError would reach the driver wrapped in a multi-line traceback.)
    """
    @functools.wraps(fn)  # keeps the task's name in Ray's dashboard and logs
    def run(*args, **kwargs) -> dict:
        try:
            return fn(*args, **kwargs)
        except ForgeRayError as e:
            return {"error": [getattr(e, "source", None), getattr(e, "problem", str(e))]}
    return run


@ray.remote(num_cpus=1)
@_guarded
def _read_task(chunk: sources.Chunk, src: int, c: int, tmp: str, buckets: int,
               strict: bool, row_ids: np.ndarray | None) -> dict:
    """Read one chunk, write its shards and key files; return counts (no rows).

    ``row_ids`` (contrastive npz only) is the row -> item id array, shared through
    the object store so that no worker unpickles ``itemEncID`` again.
    """
    options = {"row_ids": row_ids} if row_ids is not None else {}
    res = sources.read_chunk(chunk, strict=strict, **options)
    table, kind = res.table, chunk.table
    prefix = f"s{src:03d}-c{c:06d}"
    root = Path(tmp)
    folder = {"items": root / "items", "sequences": root / "sequences", "sids": root / "sids",
              "targets": root / "targets", "pairs": root / "stage" / "pairs",
              "interactions": root / "stage" / "interactions"}[kind]
    if table.num_rows:
        with ShardWriter(folder, table.schema, prefix=prefix) as w:
            w.write(table)
    out = {"src": src, "chunk": c, "table": kind, "prefix": prefix, "rows": table.num_rows,
           "dropped": dict(res.dropped), "schema": None}
    if kind == "items":
        emb = table.schema.field("embedding").type if "embedding" in table.schema.names else None
        out["schema"] = {"dim": emb.list_size if emb else 0,
                         "dtype": np.dtype(emb.value_type.to_pandas_dtype()).name if emb else None,
                         "columns": table.schema.names}
    if kind in KEYED:
        keys = pa.table({"item_id": table["item_id"],
                         "src": pa.array(np.full(table.num_rows, src, np.int32)),
                         "chunk": pa.array(np.full(table.num_rows, c, np.int32)),
                         "row": pa.array(np.arange(table.num_rows, dtype=np.int64)),
                         "h": pa.array(_row_hash(table))}, schema=_KEY_SCHEMA)
        _write_buckets(keys, root / "keys" / kind, prefix, buckets)
    elif kind == "pairs" and table.num_rows:
        ids = sorted_unique(np.concatenate([table["item_a"].to_numpy(), table["item_b"].to_numpy()]))
        _write_buckets(pa.table({"item_id": ids}), root / "keys" / "refs", prefix, buckets)
    return out


@ray.remote(num_cpus=1)
@_guarded
def _check_task(tmp: str, bucket: int, names: list[str]) -> dict:
    """Repeated ids (items, sids) and unknown pair ids of one hash bucket."""
    root = Path(tmp) / "keys"
    out = {"remove": {}, "merged": {}}
    for table, repeat_ok in KEYED.items():
        ids, removed, merged = _repeats(root, table, bucket, names, repeat_ok)
        out["remove"][table], out["merged"][table] = removed, merged
        if table == "items":
            known = ids
    refs = _read_dir(root / "refs" / f"b{bucket:04d}", pa.schema([("item_id", pa.int64())]))
    refs = sorted_unique(refs["item_id"].to_numpy())
    unknown = refs[~np.isin(refs, known)]
    if len(unknown):
        (root / "unknown").mkdir(parents=True, exist_ok=True)
        np.save(root / "unknown" / f"b{bucket:04d}.npy", unknown)
    out.update(unknown=int(len(unknown)), example=int(unknown[0]) if len(unknown) else None)
    return out


def _repeats(root: Path, table: str, bucket: int, names: list[str],
             repeat_ok: bool) -> tuple[np.ndarray, list[int], dict[int, int]]:
    """Check one bucket's keys of ``table``; record redundant copies for removal.

    Returns the bucket's sorted ids, the chunks holding copies to remove, and the
    number of copies merged per source.
    """
    keys = _read_dir(root / table / f"b{bucket:04d}", _KEY_SCHEMA)
    cols = [keys[n].to_numpy() for n in ("item_id", "src", "chunk", "row", "h")]
    order = np.lexsort(cols[3::-1])  # by item_id, then src, chunk, row
    ids, src, chunk, row, h = (c[order] for c in cols)
    rep = np.flatnonzero(ids[1:] == ids[:-1]) + 1  # every copy after a group's first row
    same = rep[src[rep] == src[rep - 1]]
    if len(same) and not repeat_ok:
        j = same[0]
        raise InputError(names[src[j]], f"item id {ids[j]} appears more than once in {table}")
    first = np.searchsorted(ids, ids[rep])  # the kept (first-source) row of each group
    differ = rep[h[rep] != h[first]]
    if len(differ):
        j, f = differ[0], first[np.flatnonzero(h[rep] != h[first])[0]]
        where = "again" if src[j] == src[f] else f"also in {names[src[f]]}"
        raise InputError(names[src[j]], f"item id {ids[j]} appears {where} with different "
                                        f"{'embedding/text' if table == 'items' else table}")
    if len(rep):
        folder = root / "remove" / table
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"chunk": chunk[rep], "row": row[rep]}, schema=_REMOVE_SCHEMA),
                       folder / f"b{bucket:04d}.parquet")
    return ids, sorted(set(chunk[rep].tolist())), dict(Counter(src[rep].tolist()))


@ray.remote(num_cpus=1)
@_guarded
def _drop_rows_task(tmp: str, table: str, c: int) -> dict:
    """Rewrite one chunk's ``table`` shards without its redundant copies."""
    root = Path(tmp)
    drop = pq.read_table(root / "keys" / "remove" / table, schema=_REMOVE_SCHEMA,
                         filters=[("chunk", "=", c)])["row"].to_numpy()
    shards = sorted((root / table).glob(f"s*-c{c:06d}-*.parquet"))
    data = pa.concat_tables([pq.read_table(p) for p in shards])
    keep = np.ones(data.num_rows, bool)
    keep[drop] = False
    for p in shards:
        p.unlink()
    prefix = shards[0].name.rsplit("-", 1)[0]
    with ShardWriter(root / table, data.schema, prefix=prefix) as w:
        w.write(data.filter(pa.array(keep)))
    return {"removed": int(len(drop))}


@ray.remote(num_cpus=1)
@_guarded
def _filter_pairs_task(tmp: str, prefix: str, any_unknown: bool) -> dict:
    """Move one chunk's staged pairs into ``pairs/``, minus pairs naming unknown items."""
    root = Path(tmp)
    staged = sorted((root / "stage" / "pairs").glob(f"{prefix}-*.parquet"))
    dest = root / "pairs"
    dest.mkdir(exist_ok=True)
    if not any_unknown:
        for p in staged:
            os.replace(p, dest / p.name)
        return {"dropped": 0}
    unknown = np.concatenate([np.load(p) for p in sorted((root / "keys" / "unknown").glob("*.npy"))])
    dropped = 0
    with ShardWriter(dest, PAIRS_SCHEMA, prefix=prefix) as w:
        for p in staged:
            t = pq.read_table(p)
            bad = np.isin(t["item_a"].to_numpy(), unknown) | np.isin(t["item_b"].to_numpy(), unknown)
            dropped += int(bad.sum())
            w.write(t.filter(pa.array(~bad)))
            p.unlink()
    return {"dropped": dropped}


# --------------------------------------------------------------------------- helpers

def _row_hash(table: pa.Table) -> np.ndarray:
    """A 64-bit fingerprint per item row, to tell identical copies from conflicts.

    Embedding rows hash their raw bytes (multiply-add of 32-bit words with fixed odd
    multipliers, wrapping mod 2**64); other rows (text-only items, SID codes) hash
    the CRC32 of their non-id values.
    """
    n = table.num_rows
    if n == 0:  # e.g. a chunk whose every row was dropped
        return np.zeros(0, np.uint64)
    if "embedding" in table.schema.names:
        flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        raw = np.ascontiguousarray(flat).view(np.uint8).reshape(n, -1)
        raw = np.pad(raw, ((0, 0), (0, (-raw.shape[1]) % 4))).view(np.uint32)
        mult = np.random.default_rng(0x5EED).integers(1, 2**63, raw.shape[1], dtype=np.uint64) | 1
        out = np.empty(n, np.uint64)
        for i in range(0, n, 4096):  # blocks keep the uint64 temporary at ~16 MB
            out[i:i + 4096] = (raw[i:i + 4096].astype(np.uint64) * mult).sum(1, dtype=np.uint64)
        return out
    cols = [c for c in table.schema.names if c != "item_id"]
    values = zip(*(table[c].to_pylist() for c in cols)) if cols else ([] for _ in range(n))
    return np.array([zlib.crc32("\x1f".join(map(str, v)).encode()) for v in values], np.uint64)


def _write_buckets(keys: pa.Table, folder: Path, prefix: str, buckets: int) -> None:
    b = bucket_of(keys["item_id"].to_numpy(), buckets)
    order = np.argsort(b, kind="stable")
    bounds = np.searchsorted(b[order], np.arange(buckets + 1))
    for k in range(buckets):
        if bounds[k + 1] > bounds[k]:
            sub = folder / f"b{k:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            pq.write_table(keys.take(order[bounds[k]:bounds[k + 1]]), sub / f"{prefix}.parquet")


def _read_dir(folder: Path, schema: pa.Schema) -> pa.Table:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    return pq.read_table(files, schema=schema) if files else schema.empty_table()


def _gather(refs: list, what: str, progress: bool) -> list[dict]:
    """Wait for ``refs`` in order of completion; re-raise the first user error.

    On an error the queued tasks are cancelled and the running ones awaited, so no
    task writes into the temporary folder after it is deleted.
    """
    pending, results = list(refs), {}
    index = {r: i for i, r in enumerate(refs)}
    with tqdm(total=len(refs), desc=f"ingest: {what}", unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            res = ray.get(done[0])
            if "error" in res:
                for r in pending:
                    ray.cancel(r)
                ray.wait(pending, num_returns=len(pending))
                raise InputError(*res["error"])
            results[index[done[0]]] = res
            bar.update()
    return [results[i] for i in range(len(refs))]


def _check_declared_dims(names: list[str], infos: list[dict]) -> None:
    """Refuse sources whose headers already declare different embedding shapes."""
    seen: tuple[str, Any] | None = None
    for name, info in zip(names, infos):
        if not info.get("embedding_dim"):
            continue
        # readers write float16 as float16 and every other float as float32
        shape = (info["embedding_dim"],
                 "float16" if info.get("embedding_dtype") == "float16" else "float32")
        if seen and seen[1] != shape:
            raise InputError(name, f"embeddings are {shape[0]}-d {shape[1]} but {seen[0]} has "
                                   f"{seen[1][0]}-d {seen[1][1]}")
        seen = seen or (name, shape)


def _check_item_columns(names: list[str], read: list[dict]) -> dict | None:
    """All items chunks must agree on embedding dim/dtype and columns."""
    first = None
    for r in read:
        if r["schema"] is None or not r["rows"]:
            continue
        if first is None:
            first = r
        elif r["schema"] != first["schema"]:
            a, b = first["schema"], r["schema"]
            raise InputError(names[r["src"]], f"items have {b['dim']}-d {b['dtype']} embeddings "
                             f"and columns {b['columns']} but {names[first['src']]} has "
                             f"{a['dim']}-d {a['dtype']} and {a['columns']}")
    return first["schema"] if first else None


def _manifest(tmp: Path, names, fmts, infos, read, checked, unknown_drops, item_cols, buckets,
              config: IngestConfig) -> dict:
    per_src = [{"path": os.path.abspath(n), "format": f, "info": i, "rows": Counter(),
                "dropped": Counter(), "merged_duplicates": 0}
               for n, f, i in zip(names, fmts, infos)]
    for r in read:
        per_src[r["src"]]["rows"][r["table"]] += r["rows"]
        per_src[r["src"]]["dropped"].update(r["dropped"])
    for r in checked:
        for s, n in r["merged"]["items"].items():
            per_src[int(s)]["merged_duplicates"] += n
    for s, n in unknown_drops.items():
        per_src[s]["dropped"]["pair_unknown_item"] += n
    dropped = Counter()
    for s in per_src:
        dropped.update(s["dropped"])
        s["rows"], s["dropped"] = dict(s["rows"]), dict(s["dropped"])
    counts = {t: parquet_rows(tmp / t) for t in ("items", "pairs", "sequences", "sids")
              if (tmp / t).is_dir()}
    if (tmp / "sequences").is_dir():
        counts["interactions"] = parquet_rows(tmp / "sequences", list_column="item_ids")
    return write_manifest(
        tmp, DATASET_KIND, counts=counts,
        embedding_dim=item_cols["dim"] if item_cols else 0,
        embedding_dtype=item_cols["dtype"] if item_cols else None,
        item_columns=item_cols["columns"] if item_cols else [],
        sources=per_src, dropped=dict(dropped),
        merged_duplicates=sum(s["merged_duplicates"] for s in per_src),
        strict=config.strict, chunk_rows=config.chunk_rows, buckets=buckets)


def summary(manifest: dict) -> str:
    """Human summary of an ingest manifest: counts, drops, merges."""
    lines = ["dataset: " + ", ".join(f"{n:,} {t}" for t, n in manifest["counts"].items())]
    if manifest.get("embedding_dim"):
        lines.append(f"embeddings: {manifest['embedding_dim']}-d {manifest['embedding_dtype']}")
    for s in manifest["sources"]:
        rows = ", ".join(f"{n:,} {t}" for t, n in s["rows"].items()) or "nothing"
        lines.append(f"  {s['path']} [{s['format']}]: {rows}")
    if manifest.get("merged_duplicates"):
        lines.append(f"merged {manifest['merged_duplicates']:,} identical item copies "
                     "found in several sources (kept once)")
    drops = manifest.get("dropped") or {}
    lines.append("dropped: " + (", ".join(f"{n:,} {r}" for r, n in drops.items()) if drops
                                else "nothing"))
    return "\n".join(lines)
