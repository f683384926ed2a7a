"""GR examples as streaming Ray Data pipelines: sequences x SID table -> token ids.

Input: a canonical dataset's ``sequences`` table and a SIDS_DIR written by
``forge-ray assign`` (Parquet ``item_id`` int64, ``sid`` list<int64> final codes,
manifest kind ``"sids"`` with ``sizes``), or an AL-GR TSV whose histories are already
C-tokens. Output rows: ``input_ids`` list<int64> (history tokens + ``</s>``),
``labels`` list<int64> (the target SID's L token ids) and, for canonical data,
``user_id`` / ``target_item`` int64. Splits follow :mod:`forge_ray.core.gr.data`.

Joining item ids to SIDs, two ways (``GRDataConfig.join``):

- ``broadcast``: the driver loads the whole item -> SID table (8 x (1 + L) bytes per
  item: 12k Amazon items = 0.4 MB; 250M FORGE items x 3 levels = 8 GB, too big) and
  every map task gets one read-only copy from the object store.
- ``hash``: sequences are exploded to (user, position, item) rows, hash-joined with
  the SID table by item id across the cluster (``Dataset.join``), and regrouped per
  user (``groupby(user_id).map_groups``); no process ever holds the whole table.
- ``auto`` picks broadcast below ``broadcast_limit_mb``.

Counts (unknown items, too-short sequences, truncated histories) come from a
separate counting pass (:func:`count_examples`) so the example stream itself stays
a plain row stream.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from forge_ray.config import require
from forge_ray.core.gr.algr import COLUMNS as ALGR_COLUMNS, iter_algr, parse_rows
from forge_ray.core.gr.data import ExampleCounts, ItemSIDTable, Split, build_examples, build_sequence_examples
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.distributed.dataset import read_sequences
from forge_ray.distributed.remote_errors import user_error
from forge_ray.sid_table import SidTable

EXAMPLE_SCHEMA = pa.schema([("user_id", pa.int64()), ("target_item", pa.int64()),
                            ("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64()))])
# windows also carry their history's item ids (the eval-gr baselines rank from them)
WINDOW_SCHEMA = EXAMPLE_SCHEMA.append(pa.field("history_items", pa.list_(pa.int64())))


@dataclass
class GRDataConfig:
    """How histories become examples.

    max_history: most recent items kept per history (20 Amazon, 100 FORGE); longer
        histories are cut and counted as ``truncated``.
    min_history: shortest training prefix.
    train_examples: ``windows`` (one example per target: every prefix of the training
        part, T5 or decoder-only) or ``sequences`` (decoder-only: one example per chunk
        of up to ``max_history + 1`` items, every item after the first a target; see
        :mod:`forge_ray.core.gr.data`). Validation and test are windows either way.
    train_holdout: items at the end of each sequence kept out of training: 2 (the
        validation and test items; the protocol), 1 (a final refit that also trains on
        the validation items, once every setting was chosen on validation: validation
        then no longer measures anything, so train-gr skips it), 3 (that refit
        back-tested on the validation split). See :mod:`forge_ray.core.gr.data`.
    join: ``auto`` | ``broadcast`` | ``hash`` (see module doc).
    broadcast_limit_mb: ``auto`` broadcasts SID tables up to this size.
    batch_rows: sequences per map batch.
    algr_sizes: codebook sizes of an AL-GR input when no SIDS_DIR is given.
    """

    max_history: int = 20
    min_history: int = 1
    train_examples: Literal["windows", "sequences"] = "windows"
    train_holdout: int = 2
    join: Literal["auto", "broadcast", "hash"] = "auto"
    broadcast_limit_mb: float = 1024.0
    batch_rows: int = 1024
    algr_sizes: tuple[int, ...] = (8192, 8192, 8192)

    def __post_init__(self):
        require(self.max_history >= 1, "data.max_history must be >= 1")
        require(1 <= self.min_history <= self.max_history, "data.min_history must be in [1, max_history]")
        require(self.train_examples in ("windows", "sequences"),
                f"data.train_examples must be windows or sequences, not {self.train_examples!r}")
        require(self.train_holdout >= 1, "data.train_holdout must be >= 1 (0 would train on the test item)")
        require(self.broadcast_limit_mb >= 0, "data.broadcast_limit_mb must be >= 0")
        require(self.batch_rows >= 1, "data.batch_rows must be >= 1")
        require(len(self.algr_sizes) >= 1 and min(self.algr_sizes) >= 1, "data.algr_sizes must be positive")


# ---- the SID table (forge_ray.sid_table) -------------------------------------------
def sid_sizes(sids_dir: str | os.PathLike) -> tuple[int, ...]:
    """Codebook sizes per level (suffix level included) from a SIDS_DIR manifest."""
    return SidTable.open(sids_dir).sizes


def read_sids(sids_dir: str | os.PathLike) -> ray.data.Dataset:
    """The SID table as a Ray Dataset of ``item_id`` int64, ``sid`` list<int64>."""
    files = SidTable.open(sids_dir).files
    return ray.data.read_parquet([str(p) for p in files], columns=["item_id", "sid"])


def load_sid_arrays(sids_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The whole table in this process: ((N,) item ids, (N, L) codes); see
    :meth:`SidTable.arrays` (one Parquet file at a time, 8 x (1 + L) bytes per item)."""
    return SidTable.open(sids_dir).arrays()


def table_bytes(sids_dir: str | os.PathLike) -> int:
    """Memory of the broadcast item -> SID table, from the Parquet footers."""
    return SidTable.open(sids_dir).table_bytes


# ---- sequences -> examples --------------------------------------------------------
def _examples_table(batch: dict[str, np.ndarray], counts_only: bool, table: ItemSIDTable | None,
                    vocab: SIDVocab, split: Split, max_history: int, min_history: int,
                    sequences: bool, add_eos: bool, holdout: int) -> pa.Table:
    """One map batch -> example rows (or one row of counts). Without a broadcast
    ``table`` the batch carries the joined ``codes`` (flat, -1 = unknown item).
    ``sequences``: training chunks instead of windows (``split`` is ``train``)."""
    seqs = list(batch["item_ids"])
    if table is None:  # hash-join path: a table of just this batch's items
        items = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        codes = (np.concatenate(list(batch["codes"])) if seqs else np.zeros(0, np.int64)
                 ).reshape(-1, vocab.n_levels)
        known = codes[:, 0] >= 0
        uniq, first = np.unique(items[known], return_index=True)
        table = ItemSIDTable(uniq, codes[known][first])
    if sequences:
        ex, counts = build_sequence_examples(batch["user_id"], seqs, table, vocab, max_history, min_history,
                                             holdout)
    else:
        ex, counts = build_examples(batch["user_id"], seqs, table, vocab, split, max_history, min_history,
                                    add_eos=add_eos, holdout=holdout)
    if counts_only:
        return pa.table({k: [v] for k, v in counts.__dict__.items()})
    lists = {k: pa.array(list(ex[k]), pa.list_(pa.int64())) for k in ("input_ids", "labels", "history_items")
             if k in ex}
    return pa.table({"user_id": ex["user_id"], "target_item": ex["target_item"], **lists},
                    schema=EXAMPLE_SCHEMA if sequences else WINDOW_SCHEMA)


_NO_ITEM = np.iinfo(np.int64).min  # item id of an empty sequence's placeholder row
_OCC_SCHEMA = pa.schema([("user_id", pa.int64()), ("pos", pa.int64()), ("item_id", pa.int64()),
                         ("sid", pa.list_(pa.int64()))])


def _explode(batch: pa.Table) -> pa.Table:
    """(user, item_ids list) rows -> (user_id, pos >= 0, item_id, sid null) occurrence rows."""
    lists = batch["item_ids"].combine_chunks()
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy()
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    n = int(lengths.sum())
    users = batch["user_id"].to_numpy()
    empty = users[lengths == 0]  # kept as one pos = -2 row each, so they are still counted
    return pa.table({"user_id": np.concatenate([np.repeat(users, lengths), empty]),
                     "pos": np.concatenate([np.arange(n, dtype=np.int64) - starts,
                                            np.full(len(empty), -2, np.int64)]),
                     "item_id": np.concatenate([lists.flatten().to_numpy().astype(np.int64),
                                                np.full(len(empty), _NO_ITEM, np.int64)]),
                     "sid": pa.nulls(n + len(empty), pa.list_(pa.int64()))}, schema=_OCC_SCHEMA)


def _sid_rows(batch: pa.Table) -> pa.Table:
    """SID table rows in occurrence form, marked by pos = -1."""
    n = batch.num_rows
    return pa.table({"user_id": np.full(n, -1, np.int64), "pos": np.full(n, -1, np.int64),
                     "item_id": batch["item_id"], "sid": batch["sid"]}, schema=_OCC_SCHEMA)


def _attach_sid(rows: pa.Table) -> pa.Table:
    """One item's group: its SID row (if any) + occurrences -> occurrences with the SID."""
    is_sid = pc.equal(rows["pos"], -1)
    sid_rows = rows.filter(is_sid)
    occ = rows.filter(pc.invert(is_sid))
    sid = sid_rows["sid"][0] if sid_rows.num_rows else pa.scalar(None, pa.list_(pa.int64()))
    return occ.set_column(3, "sid", pa.array([sid.as_py()] * occ.num_rows, pa.list_(pa.int64())))


def _regroup(rows: pa.Table, n_levels: int) -> pa.Table:
    """One user's joined rows -> (user_id, item_ids, codes flat with -1 for unknown)."""
    pos = rows["pos"].to_numpy()
    order = np.argsort(pos, kind="stable")
    order = order[pos[order] >= 0]  # an empty sequence's placeholder row holds no item
    sid = rows["sid"].take(pa.array(order)).to_pylist()
    codes = np.asarray([s if s is not None else [-1] * n_levels for s in sid], np.int64)
    return pa.table({"user_id": [rows["user_id"][0].as_py()],
                     "item_ids": [rows["item_id"].to_numpy()[order]],
                     "codes": [codes.reshape(-1)]})


def _joined_sequences(seqs: ray.data.Dataset, sids_dir: str, n_levels: int,
                      partitions: int) -> ray.data.Dataset:
    """Hash join by item id, then regroup by user: two shuffles, no global table.

    (Ray Data's own ``Dataset.join`` needs polars, which this project does not
    ship; a groupby on the union of both sides is the same hash join.)
    """
    occurrences = seqs.map_batches(_explode, batch_format="pyarrow")
    sid_side = read_sids(sids_dir).map_batches(_sid_rows, batch_format="pyarrow")
    joined = occurrences.union(sid_side).groupby("item_id", num_partitions=partitions).map_groups(
        _attach_sid, batch_format="pyarrow")
    return joined.groupby("user_id", num_partitions=partitions).map_groups(
        _regroup, batch_format="pyarrow", fn_kwargs={"n_levels": n_levels})


def use_broadcast(sids_dir: str | os.PathLike, cfg: GRDataConfig) -> bool:
    if cfg.join != "auto":
        return cfg.join == "broadcast"
    return table_bytes(sids_dir) <= cfg.broadcast_limit_mb * 2**20


def sequence_examples(dataset: str | os.PathLike, sids_dir: str | os.PathLike, vocab: SIDVocab,
                      split: Split, cfg: GRDataConfig, counts_only: bool = False,
                      table: ItemSIDTable | None = None, add_eos: bool = True) -> ray.data.Dataset:
    """Lazy example rows of ``split`` (or one counts row per batch with ``counts_only``).

    ``table``: an already loaded broadcast table (callers building several splits
    load it once); otherwise loaded here when the join is a broadcast.
    ``add_eos``: prompts end with ``</s>`` (:func:`forge_ray.core.gr.data.prompt_eos`).
    """
    seqs = read_sequences(dataset, columns=["user_id", "item_ids"])
    kw = dict(counts_only=counts_only, vocab=vocab, split=split,
              max_history=cfg.max_history, min_history=cfg.min_history, add_eos=add_eos,
              holdout=cfg.train_holdout, sequences=split == "train" and cfg.train_examples == "sequences")
    if table is None and use_broadcast(sids_dir, cfg):
        table = ItemSIDTable(*load_sid_arrays(sids_dir))
    if table is None:
        rows = read_sequences(dataset, columns=["item_ids"]).map_batches(
            lambda b: pa.table({"n": pc.list_value_length(b["item_ids"])}), batch_format="pyarrow")
        partitions = max(1, math.ceil((rows.sum("n") or 0) / 1_000_000))
        seqs = _joined_sequences(seqs, os.fspath(sids_dir), vocab.n_levels, partitions)
    return seqs.map_batches(_examples_table, batch_size=cfg.batch_rows, batch_format="numpy",
                            fn_kwargs={"table": table, **kw})


def count_examples(dataset: str | os.PathLike, sids_dir: str | os.PathLike, vocab: SIDVocab,
                   split: Split, cfg: GRDataConfig, table: ItemSIDTable | None = None) -> ExampleCounts:
    """Summed :class:`ExampleCounts` of ``split`` (a distributed counting pass)."""
    total = ExampleCounts()
    for batch in sequence_examples(dataset, sids_dir, vocab, split, cfg, True, table).iter_batches(
            batch_format="numpy", batch_size=None):
        total = total.merge(ExampleCounts(**{k: int(batch[k].sum()) for k in ExampleCounts().__dict__}))
    return total


# ---- AL-GR TSV input --------------------------------------------------------------
def is_algr(path: str | os.PathLike) -> bool:
    """An AL-GR file (rather than a canonical dataset folder)."""
    return Path(path).is_file()


def algr_examples(path: str | os.PathLike, vocab: SIDVocab, valid_every: int = 0,
                  part: Literal["train", "valid"] = "train", add_eos: bool = True) -> ray.data.Dataset:
    """An AL-GR training TSV as example rows (``input_ids``, ``labels``).

    valid_every: rows whose ``id`` hashes to 0 modulo this go to the ``valid``
        part, the rest to ``train`` (0 = everything is ``train``).
    """
    return _read_algr(path).map_batches(_algr_table, batch_format="pyarrow",
                                        fn_kwargs={"vocab": vocab, "source": os.fspath(path), "add_eos": add_eos,
                                                   "valid_every": valid_every, "part": part})


def algr_test_examples(path: str | os.PathLike, vocab: SIDVocab, add_eos: bool = True) -> ray.data.Dataset:
    """An AL-GR test TSV (answers: ``;``-separated true item ids) as query rows
    (``input_ids``, ``target_items``). Histories are used as the file gives them."""
    return _read_algr(path).map_batches(_algr_test_table, batch_format="pyarrow",
                                        fn_kwargs={"vocab": vocab, "source": os.fspath(path), "add_eos": add_eos})


@contextlib.contextmanager
def algr_read_errors(path: str | os.PathLike) -> Iterator[None]:
    """Run Ray Data jobs reading the AL-GR file ``path``; a file Arrow cannot parse
    fails as one line naming it.

    Ray Data's read tasks report a row with the wrong number of fields (or bytes that
    are not UTF-8) as a remote traceback without the file's problem in it. Only then
    the driver streams the file itself (memory: one block), which raises the one-line
    InputError naming the file and the row; if it finds nothing, the original error
    stands.
    """
    try:
        yield
    except Exception as e:
        if user_error(e) is None:
            for _ in iter_algr(path):
                pass
        raise


def _read_algr(path: str | os.PathLike) -> ray.data.Dataset:
    next(iter_algr(path, block_bytes=1 << 16), None)  # header check, one-line error
    import pyarrow.csv as pacsv

    return ray.data.read_csv(
        os.fspath(path), parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in ALGR_COLUMNS}))


def _algr_test_table(batch: pa.Table, vocab: SIDVocab, source: str, add_eos: bool) -> pa.Table:
    ex = parse_rows({c: batch[c].to_pylist() for c in ALGR_COLUMNS}, vocab, "items", source=source, add_eos=add_eos)
    return pa.table({"input_ids": pa.array(list(ex["input_ids"]), pa.list_(pa.int64())),
                     "target_items": pa.array(list(ex["target_items"]), pa.list_(pa.int64()))})


def _algr_table(batch: pa.Table, vocab: SIDVocab, source: str, valid_every: int, part: str,
                add_eos: bool) -> pa.Table:
    rows = {c: batch[c].to_pylist() for c in ALGR_COLUMNS}
    ex = parse_rows(rows, vocab, "sid", source=source, add_eos=add_eos)
    keep = np.ones(len(ex["id"]), dtype=bool)
    if valid_every:  # a stable hash of the row id: the same rows are held out on every run
        in_valid = np.asarray([zlib.crc32(str(i).encode()) % valid_every == 0 for i in ex["id"]])
        keep = in_valid if part == "valid" else ~in_valid
    n = int(keep.sum())
    return pa.table({"user_id": np.full(n, -1, np.int64), "target_item": np.full(n, -1, np.int64),
                     "input_ids": pa.array(list(ex["input_ids"][keep]), pa.list_(pa.int64())),
                     "labels": pa.array(list(ex["labels"][keep]), pa.list_(pa.int64()))},
                    schema=EXAMPLE_SCHEMA)
