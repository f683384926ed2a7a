"""AL-GR, Amazon, interactions CSV/Parquet and canonical Parquet readers."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge_ray.core.sid.codes import pack_codes, parse_sid_sequence, unpack_codes
from forge_ray.data import sources
from forge_ray.data.schema import embedding_array, embeddings_to_numpy
from forge_ray.errors import InputError

SIZES = (8192, 8192, 8192)


def _read_all(path, table, chunk_rows=65536, **kw):
    chunks = [c for c in sources.plan(path, chunk_rows=chunk_rows, **kw) if c.table == table]
    results = [sources.read_chunk(c) for c in chunks]
    dropped: dict[str, int] = {}
    for r in results:
        for k, v in r.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    return pa.concat_tables([r.table for r in results]), dropped


def _one_line(err, path):
    assert "\n" not in str(err.value) and str(err.value).startswith(os.fspath(path))


# ---------------------------------------------------------------- AL-GR

def test_algr_real_sample(shared_data):
    path = shared_data / "algr" / "train_data_sample.tsv"
    assert sources.detect(path) == "algr_tsv"
    seqs, dropped = _read_all(path, "sequences", chunk_rows=3)
    sids, _ = _read_all(path, "sids", chunk_rows=3)
    assert dropped == {} and seqs.num_rows == 10
    assert len(set(seqs["user_id"].to_pylist())) == 10
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    first = lines[0].split("\t")
    assert seqs["user_key"][0].as_py() == first[0]
    answer = parse_sid_sequence(first[3], SIZES)
    items = np.asarray(seqs["item_ids"][0].as_py())
    assert items[-1] == pack_codes(answer, SIZES)[0]       # answer appended last
    assert len(items) == 100                                # 297 history tokens / 3 + answer
    # every sequence item has its SID in the sids table, and the codes round-trip
    table = dict(zip(sids["item_id"].to_pylist(), sids["codes"].to_pylist()))
    all_items = {i for s in seqs["item_ids"].to_pylist() for i in s}
    assert all_items <= set(table)
    for item_id, codes in list(table.items())[:50]:
        assert unpack_codes(np.array([item_id]), SIZES)[0].tolist() == codes


def _algr(tmp_path, rows):
    path = tmp_path / "a.tsv"
    path.write_text("id\tsystem\tuser\tanswer\n" + "".join("\t".join(r) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_algr_test_file_answers_go_to_targets(tmp_path):
    path = _algr(tmp_path, [("u1", "sys", "history: C1C8193C16385C2C8194C16386, go", "11;22;33"),
                            ("u2", "sys", "history: C3C8195C16387", "44")])
    seqs, _ = _read_all(path, "sequences")
    targets, _ = _read_all(path, "targets")
    assert [len(s) for s in seqs["item_ids"].to_pylist()] == [2, 1]   # history only
    assert targets["item_ids"].to_pylist() == [[11, 22, 33], [44]]
    assert targets["user_id"].to_pylist() == seqs["user_id"].to_pylist()


def test_algr_malformed_rows_dropped_or_refused(tmp_path):
    path = _algr(tmp_path, [("ok", "s", "C1C8193C16385", "C2C8194C16386"),
                            ("bad_fields", "s", "C1C8193C16385"),
                            ("no_history", "s", "nothing here", "C2C8194C16386"),
                            ("partial_sid", "s", "C1C8193", "C2C8194C16386"),
                            ("off_level", "s", "C8193C1C16385", "C2C8194C16386"),
                            ("bad_answer", "s", "C1C8193C16385", "hello")])
    seqs, dropped = _read_all(path, "sequences")
    assert seqs["user_key"].to_pylist() == ["ok"]
    assert dropped == {"malformed_line": 1, "empty_sequence": 1, "malformed_sid": 2,
                       "malformed_answer": 1}
    with pytest.raises(InputError, match="malformed line") as err:
        sources.read_chunk(sources.plan(path)[0], strict=True)
    _one_line(err, path)


def test_algr_overflowing_codes_and_non_utf8_rows_are_malformed(tmp_path):
    """A C-token or answer id beyond int64 and a row that is not UTF-8 are dropped and
    counted like any malformed row (refused under strict), not a numpy/decode crash."""
    path = _algr(tmp_path, [("ok", "s", "C1C8193C16385", "C2C8194C16386"),
                            ("big_token", "s", "C99999999999999999999999C8193C16385", "C2C8194C16386"),
                            ("big_answer_sid", "s", "C1C8193C16385", "C2C8194C99999999999999999999"),
                            ("big_target", "s", "C1C8193C16385", "11;99999999999999999999")])
    with open(path, "ab") as f:
        f.write(b"latin1\ts\t\xe9t\xe9 C1C8193C16385\tC2C8194C16386\n")
    seqs, dropped = _read_all(path, "sequences")
    assert seqs["user_key"].to_pylist() == ["ok"]
    assert dropped == {"malformed_sid": 2, "malformed_answer": 1, "malformed_line": 1}
    with pytest.raises(InputError, match="malformed sid in the row at byte") as err:
        sources.read_chunk(sources.plan(path)[0], strict=True)
    _one_line(err, path)


def test_algr_custom_sizes_and_chunk_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    sizes = (16, 16)
    rows, expect = [], []
    for u in range(40):
        codes = rng.integers(0, 16, (int(rng.integers(1, 6)), 2))
        hist = "".join(f"C{a}C{b + 16}" for a, b in codes[:-1]) or "C0C16"
        if len(codes) == 1:
            codes = np.concatenate([[[0, 0]], codes])
        a, b = codes[-1]
        rows.append((f"u{u}", "s", f"prompt {hist} end", f"C{a}C{b + 16}"))
        expect.append(pack_codes(codes, sizes).tolist())
    path = _algr(tmp_path, rows)
    seqs, dropped = _read_all(path, "sequences", chunk_rows=3, sid_sizes=sizes)
    assert dropped == {} and seqs["item_ids"].to_pylist() == expect


def test_algr_bad_header(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("id\tuser\tanswer\nx\ty\tz\n")
    with pytest.raises(InputError) as err:
        sources.plan(path, "algr_tsv")
    _one_line(err, path)


# ---------------------------------------------------------------- Amazon

def test_amazon_beauty_counts(shared_data):
    folder = shared_data / "amazon" / "Beauty"
    assert sources.detect(folder) == "amazon"
    seqs, sd = _read_all(folder, "sequences", chunk_rows=4000)
    items, idrop = _read_all(folder, "items", chunk_rows=4000)
    assert sd == {} and idrop == {}
    assert seqs.num_rows == 22_363
    assert items.num_rows == 12_101
    assert sum(len(s) for s in seqs["item_ids"].to_pylist()) == 198_502
    assert len(set(seqs["user_id"].to_pylist())) == 22_363
    assert items["item_id"].to_pylist() == list(range(12_101))
    first = (folder / "item_text.txt").read_text().splitlines()[0].split(" ", 1)
    assert items["item_key"][0].as_py() == first[0] and items["text"][0].as_py() == first[1]
    # a user's ASINs map back through item_key
    key = dict(zip(items["item_id"].to_pylist(), items["item_key"].to_pylist()))
    line = (folder / "user_sequence.txt").read_text().splitlines()[0].split()
    assert seqs["user_key"][0].as_py() == line[0]
    assert [key[i] for i in seqs["item_ids"][0].as_py()] == line[1:]


def test_amazon_unknown_items_and_duplicates(tmp_path):
    (tmp_path / "item_text.txt").write_text("A one\nB two\nA again\nC three\n")
    (tmp_path / "user_sequence.txt").write_text("u1 A B Z\nu2 Z\nu3 C A\n")
    seqs, dropped = _read_all(tmp_path, "sequences")
    items, idrop = _read_all(tmp_path, "items")
    assert items["item_key"].to_pylist() == ["A", "B", "C"] and items["item_id"].to_pylist() == [0, 1, 2]
    assert idrop == {"duplicate_item": 1}
    assert seqs["item_ids"].to_pylist() == [[0, 1], [2, 0]]
    assert dropped == {"unknown_item": 2, "empty_sequence": 1}
    with pytest.raises(InputError, match="absent") as err:
        sources.read_chunk([c for c in sources.plan(tmp_path) if c.table == "sequences"][0], strict=True)
    assert "user_sequence.txt" in str(err.value) and "\n" not in str(err.value)


def test_amazon_missing_file(tmp_path):
    (tmp_path / "user_sequence.txt").write_text("u1 A\n")
    with pytest.raises(InputError, match="item_text.txt is missing") as err:
        sources.plan(tmp_path, "amazon")
    _one_line(err, tmp_path)


# ---------------------------------------------------------------- interactions

def test_interactions_csv_aliases_and_nulls(tmp_path):
    path = tmp_path / "log.csv"
    rows = [(u % 7, 1000 + u, 1_700_000_000 + u) for u in range(200)]
    path.write_text("UserID,Item,time\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows) + "3,,5\n")
    assert sources.detect(path) == "interactions"
    table, dropped = _read_all(path, "interactions", chunk_rows=17)
    assert dropped == {"null_field": 1}
    assert table.schema.names == ["user_id", "item_id", "timestamp"]
    assert list(zip(*(table[c].to_pylist() for c in table.schema.names))) == rows
    with pytest.raises(InputError) as err:
        sources.read_chunk(sources.plan(path)[-1], strict=True)
    _one_line(err, path)


def test_interactions_parquet_timestamps_and_string_ids(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": [1, 2], "item_id": [5, 6],
                             "timestamp": pa.array([1_700_000_000_500, 1_700_000_001_000], pa.timestamp("ms"))}),
                   path)
    assert sources.detect(path) == "interactions"
    table, _ = _read_all(path, "interactions")
    assert table["timestamp"].to_pylist() == [1_700_000_000, 1_700_000_001]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user": ["a"], "item": [1], "ts": [3]}), bad)
    with pytest.raises(InputError, match="integer ids") as err:
        _read_all(bad, "interactions")
    _one_line(err, bad)


def test_unrecognised_text(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello world\n")
    with pytest.raises(InputError, match="unrecognised input") as err:
        sources.detect(path)
    _one_line(err, path)


# ---------------------------------------------------------------- Parquet

def test_parquet_dataset_folder(tmp_path):
    emb = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    emb[3, 1] = np.nan
    (tmp_path / "items").mkdir()
    (tmp_path / "pairs").mkdir()
    (tmp_path / "sequences").mkdir()
    pq.write_table(pa.table({"item_id": np.arange(50), "embedding": embedding_array(emb),
                             "text": [f"t{i}" for i in range(50)]}),
                   tmp_path / "items" / "part-0.parquet", row_group_size=20)
    pq.write_table(pa.table({"item_a": [1, 2], "item_b": [3, 4]}), tmp_path / "pairs" / "p.parquet")
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_ids": [[1, 2], [], [3]]}),
                   tmp_path / "sequences" / "s.parquet")
    assert sources.detect(tmp_path) == "parquet"
    info = sources.source_info(tmp_path)
    assert info["embedding_dim"] == 4 and info["rows"] == {"items": 50, "pairs": 2, "sequences": 3}
    items, idrop = _read_all(tmp_path, "items", chunk_rows=10)
    assert idrop == {"nan_embedding": 1} and items.num_rows == 49
    keep = np.setdiff1d(np.arange(50), [3])
    np.testing.assert_array_equal(embeddings_to_numpy(items["embedding"]), emb[keep])
    assert items["text"].to_pylist() == [f"t{i}" for i in keep]
    seqs, sdrop = _read_all(tmp_path, "sequences")
    assert sdrop == {"empty_sequence": 1} and seqs["user_id"].to_pylist() == [1, 3]
    pairs, _ = _read_all(tmp_path, "pairs")
    assert pairs["item_b"].to_pylist() == [3, 4]


def test_parquet_variable_width_embeddings_refused(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "embedding": [[1.0, 2.0], [1.0]]}), path)
    with pytest.raises(InputError, match="differing widths") as err:
        _read_all(path, "items")
    _one_line(err, path)


def test_parquet_item_ids_null_or_not_integers(tmp_path):
    """Null ids are dropped and counted (refused when strict); ids that are not
    integers ('id999') are refused; a chunk whose every row is dropped is empty."""
    path = tmp_path / "items.parquet"
    emb = pa.array([[0.1, 0.2]] * 3, pa.list_(pa.float32(), 2))
    pq.write_table(pa.table({"item_id": pa.array([1, None, 3], pa.int64()), "embedding": emb}), path)
    items, dropped = _read_all(path, "items")
    assert items["item_id"].to_pylist() == [1, 3] and dropped == {"null_item_id": 1}
    with pytest.raises(InputError, match=r"1 item row\(s\) with a null item_id") as err:
        sources.read_chunk(sources.plan(path)[0], strict=True)
    _one_line(err, path)
    pq.write_table(pa.table({"item_id": ["id1", "id2", "id999"], "embedding": emb}), path)
    with pytest.raises(InputError, match="column 'item_id' must hold integer ids, found string") as err:
        _read_all(path, "items")
    _one_line(err, path)
    nan = pa.array([[float("nan"), 0.2]] * 3, pa.list_(pa.float32(), 2))
    pq.write_table(pa.table({"item_id": pa.array([1, None, 3], pa.int64()), "embedding": nan}), path)
    items, dropped = _read_all(path, "items")
    assert items.num_rows == 0 and dropped == {"null_item_id": 1, "nan_embedding": 2}


def test_parquet_pairs_that_do_not_convert(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"item_a": ["a", "b"], "item_b": [1, 2]}), path)
    with pytest.raises(InputError, match="do not convert to the canonical pairs table") as err:
        _read_all(path, "pairs")
    _one_line(err, path)


def test_amazon_files_named_as_their_folder(tmp_path):
    folder = tmp_path / "Beauty"
    folder.mkdir()
    seqs, items = folder / "user_sequence.txt", folder / "item_text.txt"
    seqs.write_text("u1 A B\n")
    items.write_text("A a\nB b\n")
    other = str(tmp_path / "x.npz")
    assert sources.amazon_files_as_folders([other, str(items), str(seqs)]) == [other, str(folder)]
    assert sources.amazon_files_as_folders([str(folder)]) == [str(folder)]
    with pytest.raises(InputError, match="name both files") as err:
        sources.amazon_files_as_folders([str(seqs)])
    _one_line(err, seqs)


def test_parquet_unknown_columns(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"foo": [1]}), path)
    with pytest.raises(InputError, match="match no known table") as err:
        sources.detect(path)
    _one_line(err, path)


def test_chunks_are_picklable_and_small():
    import pickle

    c = sources.Chunk("/x/y.npz", "forge_contrastive_npz", "items", 0, 10, "embeds")
    assert pickle.loads(pickle.dumps(c)) == c and len(pickle.dumps(c)) < 300


def test_global_check_helpers():
    assert sources.duplicates(np.array([3, 1, 3, 2, 1, 3])).tolist() == [1, 3]
    known = np.array([1, 5, 9])
    assert sources.unknown(np.array([5, 6, 0, 9, 10]), known).tolist() == [False, True, True, False, True]
