"""npz streaming: row ranges, headers, safe unpickling, FORGE npz validation."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from forge_ray.data import forge_npz, npz, sources
from forge_ray.data.schema import embeddings_to_numpy
from forge_ray.errors import InputError


def _one_line(err: pytest.ExceptionInfo, path) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(os.fspath(path)), msg


def _forge_contrastive(path, n=300, d=8, seed=0, compressed=False, enc=None, **extra):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, n, replace=False).astype(np.int64)
    rows = rng.permutation(n)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    embeds = np.empty_like(emb)
    embeds[rows] = emb
    enc = {int(i): int(r) for i, r in zip(ids, rows)} if enc is None else enc
    arrays = dict(itemEncID=np.array(enc, dtype=object), pairs=ids[rng.integers(0, n, (40, 2))],
                  embeds=embeds)
    arrays.update(extra)
    (np.savez_compressed if compressed else np.savez)(path, **{k: v for k, v in arrays.items() if v is not None})
    return ids, emb, arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_read_rows_equals_in_memory(tmp_path, compressed):
    a = np.random.default_rng(1).standard_normal((1000, 5)).astype(np.float32)
    b = np.arange(1000, dtype=np.int64)
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, a=a, b=b)
    infos = npz.members(path)
    assert infos["a"].shape == (1000, 5) and infos["a"].compressed == compressed
    for start, stop in [(0, 1), (0, 1000), (137, 512), (999, 1000), (500, 500)]:
        np.testing.assert_array_equal(npz.read_rows(path, infos["a"], start, stop), a[start:stop])
        np.testing.assert_array_equal(npz.read_rows(path, infos["b"], start, stop), b[start:stop])
    blocks = list(npz.iter_rows(path, infos["a"], 300, start=10))
    assert [s for s, _ in blocks] == [10, 310, 610, 910]
    np.testing.assert_array_equal(np.concatenate([r for _, r in blocks]), a[10:])


def test_writer_streams_members_np_load_reads_them(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((1000, 7)).astype(np.float32)
    enc = {int(k): i for i, k in enumerate(rng.choice(10**12, 1000, replace=False))}
    path = tmp_path / "w.npz"
    with npz.NpzWriter(path) as w:
        with w.stream("embeds", np.float32, emb.shape) as s:
            for i in range(0, 1000, 128):
                s.write(emb[i:i + 128])
        w.add_pickled("itemEncID", enc)
    with np.load(path, allow_pickle=True) as z:
        np.testing.assert_array_equal(z["embeds"], emb)
        assert z["itemEncID"].item() == enc
    infos = npz.members(path)
    assert npz.read_pickled(path, infos["itemEncID"]) == enc
    np.testing.assert_array_equal(npz.read_rows(path, infos["embeds"], 3, 900), emb[3:900])


def test_writer_refuses_wrong_row_count(tmp_path):
    with npz.NpzWriter(tmp_path / "w.npz") as w, pytest.raises(ValueError, match="declared"):
        with w.stream("a", np.float32, (10, 2)) as s:
            s.write(np.zeros((4, 2)))


@pytest.mark.parametrize("compressed", [False, True])
def test_contrastive_roundtrip(tmp_path, compressed):
    path = tmp_path / "c.npz"
    ids, emb, arrays = _forge_contrastive(path, compressed=compressed)
    assert sources.detect(path) == "forge_contrastive_npz"
    chunks = sources.plan(path, chunk_rows=70)
    items = pa.concat_tables([sources.read_chunk(c).table for c in chunks if c.table == "items"])
    pairs = pa.concat_tables([sources.read_chunk(c).table for c in chunks if c.table == "pairs"])
    got = dict(zip(items["item_id"].to_pylist(), embeddings_to_numpy(items["embedding"])))
    assert len(got) == len(ids)
    for i, e in zip(ids, emb):
        np.testing.assert_array_equal(got[int(i)], e)
    np.testing.assert_array_equal(np.stack([pairs["item_a"].to_numpy(), pairs["item_b"].to_numpy()], 1),
                                  arrays["pairs"])
    info = sources.source_info(path)
    assert info["embedding_dim"] == 8 and info["rows"] == {"items": 300, "pairs": 40}
    # row ids shared by the caller give the same table
    c = chunks[1]
    same = sources.read_chunk(c, row_ids=forge_npz.row_item_ids(path)).table
    assert same.equals(sources.read_chunk(c).table)


def test_numpy_int64_keys(tmp_path):
    path = tmp_path / "c.npz"
    rng = np.random.default_rng(3)
    ids = rng.choice(10**12, 50, replace=False).astype(np.int64)
    enc = {np.int64(i): np.int64(r) for r, i in enumerate(ids)}
    np.savez(path, itemEncID=np.array(enc, dtype=object), pairs=np.zeros((0, 2), np.int64),
             embeds=np.ones((50, 4), np.float32))
    np.testing.assert_array_equal(forge_npz.row_item_ids(path), ids)


def test_reconstruct_roundtrip_and_nan(tmp_path):
    path = tmp_path / "r.npz"
    emb = np.random.default_rng(4).standard_normal((100, 6)).astype(np.float32)
    emb[[5, 70]] = np.nan
    emb[71, 2] = np.inf
    ids = np.arange(100, dtype=np.int64) * 7 + 855036080309
    np.savez(path, ids=ids, embeds=emb)
    assert sources.detect(path) == "forge_reconstruct_npz"
    results = [sources.read_chunk(c) for c in sources.plan(path, chunk_rows=64)]
    assert [r.dropped for r in results] == [{"nan_embedding": 1}, {"nan_embedding": 2}]
    table = pa.concat_tables([r.table for r in results])
    keep = np.setdiff1d(np.arange(100), [5, 70, 71])
    np.testing.assert_array_equal(table["item_id"].to_numpy(), ids[keep])
    np.testing.assert_array_equal(embeddings_to_numpy(table["embedding"]), emb[keep])
    with pytest.raises(InputError) as err:
        sources.read_chunk(sources.plan(path, chunk_rows=64)[0], strict=True)
    _one_line(err, path)
    assert "row 5" in str(err.value)


# ---------------------------------------------------------------- bad inputs

def test_truncated_zip(tmp_path):
    path = tmp_path / "c.npz"
    _forge_contrastive(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated") as err:
        sources.plan(path, "forge_contrastive_npz")
    _one_line(err, path)


def test_garbage_file(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(InputError) as err:
        sources.plan(path, "forge_contrastive_npz")
    _one_line(err, path)


def test_missing_member(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, itemEncID=np.array({1: 0}, dtype=object), embeds=np.ones((1, 4), np.float32))
    with pytest.raises(InputError, match="missing npz member.*pairs") as err:
        sources.plan(path, "forge_contrastive_npz")
    _one_line(err, path)


def test_ids_embeds_length_mismatch(tmp_path):
    path = tmp_path / "r.npz"
    np.savez(path, ids=np.arange(5), embeds=np.ones((6, 4), np.float32))
    with pytest.raises(InputError, match="ids has 5 rows but embeds has 6") as err:
        sources.plan(path)
    _one_line(err, path)


def test_embeds_not_2d(tmp_path):
    path = tmp_path / "r.npz"
    np.savez(path, ids=np.arange(5), embeds=np.ones((5, 4, 2), np.float32))
    with pytest.raises(InputError, match="2-D float") as err:
        sources.plan(path)
    _one_line(err, path)


def test_member_shorter_than_header(tmp_path):
    path = tmp_path / "r.npz"
    np.savez(path, ids=np.arange(5), embeds=np.ones((5, 4), np.float32))
    # rewrite the embeds member with a header promising more rows than stored
    good = tmp_path / "good.npz"
    os.replace(path, good)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi)
            if zi.filename == "embeds.npy":
                data = data.replace(b"(5, 4)", b"(9, 4)")
            zout.writestr(zi.filename, data)
    with pytest.raises(InputError, match="truncated") as err:
        sources.plan(path)
    _one_line(err, path)


@pytest.mark.parametrize("enc,problem", [
    ({1: 0, 2: 5, 3: 2}, "outside"),
    ({1: 0, 2: 0, 3: 2}, "bijection"),
    ({1: 0, 2: 1}, "entries"),
    ([0, 1, 2], "must be a dict"),
])
def test_bad_item_enc_id(tmp_path, enc, problem):
    path = tmp_path / "c.npz"
    np.savez(path, itemEncID=_obj(enc), pairs=np.zeros((0, 2), np.int64), embeds=np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match=problem) as err:
        sources.plan(path)
    _one_line(err, path)


def _obj(value) -> np.ndarray:
    holder = np.empty((), dtype=object)
    holder[()] = value
    return holder


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c.npz"
    np.savez(path, itemEncID=_obj({1: 0, 2: _Evil(str(marker))}),
             pairs=np.zeros((0, 2), np.int64), embeds=np.ones((2, 4), np.float32))
    with pytest.raises(InputError, match="refused global") as err:
        sources.plan(path)
    _one_line(err, path)
    assert not marker.exists()
    # the same payload with a general unpickler would have run the command
    assert b"system" in zipfile.ZipFile(path).read("itemEncID.npy")


def test_restricted_unpickler_refuses_builtins_eval():
    payload = pickle.dumps(_Eval())
    import io

    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        npz.RestrictedUnpickler(io.BytesIO(payload)).load()


class _Eval:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_unrecognised_npz(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, foo=np.arange(3))
    with pytest.raises(InputError, match="unrecognised npz") as err:
        sources.detect(path)
    _one_line(err, path)


# ----------------------------------------------------------------- hostile sizes

def _npy_header(shape, dtype) -> bytes:
    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": npformat.dtype_to_descr(np.dtype(dtype)),
                                          "fortran_order": False, "shape": shape})
    return buf.getvalue()


def lying_rows_npz(path, rows: int = 10**12):
    """A ~400-byte FORGE reconstruction npz whose deflated members declare ``rows``
    rows, the zip directory agreeing (ZIP64 uncompressed size faked)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, shape, dtype in (("ids", (rows,), np.int64), ("embeds", (rows, 8), np.float32)):
            header = _npy_header(shape, dtype)
            zf.writestr(f"{name}.npy", header + bytes(64))
            zf.filelist[-1].file_size = len(header) + rows * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    return path


def binbytes8_npz(path, declared: int = 10**12):
    """A FORGE contrastive npz whose itemEncID pickle is one BINBYTES8 opcode
    declaring ``declared`` bytes followed by 16."""
    pickled = b"\x80\x04\x8e" + struct.pack("<Q", declared) + b"x" * 16 + b"."
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("itemEncID.npy", _npy_header((), object) + pickled)
        zf.writestr("pairs.npy", _npy_header((0, 2), np.int64))
        zf.writestr("embeds.npy", _npy_header((1, 4), np.float32) + bytes(16))
    return path


def test_deflated_member_declaring_more_than_deflate_can_hold(tmp_path):
    path = lying_rows_npz(tmp_path / "r.npz")
    assert path.stat().st_size < 2000
    with pytest.raises(InputError, match=r"member 'ids' declares 8000000000128 bytes but holds \d+ "
                                         "compressed bytes") as err:
        sources.plan(path, sources.detect(path), 65_536)
    _one_line(err, path)


def test_highly_compressed_zeros_still_read(tmp_path):
    """Deflate's real best case (~1030x on zeros) stays under the bound."""
    path = tmp_path / "z.npz"
    np.savez_compressed(path, ids=np.arange(4), embeds=np.zeros((4, 2_000_000), np.float32))
    info = npz.members(path)["embeds"]
    assert info.shape == (4, 2_000_000)
    assert not npz.read_rows(path, info, 3, 4).any()


def test_zero_width_rows_beyond_the_file_refused(tmp_path):
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("embeds.npy", _npy_header((10**12, 0), np.float32))
    with pytest.raises(InputError, match=r"member 'embeds' declares 1000000000000 rows of shape \(0,\)") as err:
        npz.members(path)
    _one_line(err, path)
    np.savez(path, embeds=np.zeros((5, 0), np.float32))  # a real zero-width array is fine
    assert npz.members(path)["embeds"].shape == (5, 0)


def test_other_zip_compression_refused(tmp_path):
    path = tmp_path / "b.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("ids.npy", _npy_header((2,), np.int64) + bytes(16))
    with pytest.raises(InputError, match="member 'ids' uses zip compression method 12") as err:
        npz.members(path)
    _one_line(err, path)


def test_pickle_declaring_huge_bytes_refused_before_allocating(tmp_path):
    path = binbytes8_npz(tmp_path / "c.npz")
    with pytest.raises(InputError, match=r"member 'itemEncID': unsafe or invalid pickle \(declared size "
                                         r"exceeds the data: expected 1000000000000 bytes") as err:
        sources.plan(path, sources.detect(path), 65_536)
    _one_line(err, path)


class _HugeObjectArray:
    """Pickles as numpy's own array reduce, but with a shape of 10^12 elements and a
    one-element list: numpy would allocate 8 TB before noticing the mismatch."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"),
                (1, (10**12,), np.dtype(object), False, [1]))


def test_pickled_array_shape_must_match_its_data():
    payload = pickle.dumps({1: _HugeObjectArray()}, protocol=3)
    with pytest.raises(pickle.UnpicklingError, match=r"shape \(1000000000000,\) declared with 1 elements"):
        npz.RestrictedUnpickler(io.BytesIO(payload)).load()
    # numpy's own pickles (what np.save writes) still load, as plain arrays
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    out = npz.RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": arr, "o": np.array([None, 1])}, protocol=3))).load()
    np.testing.assert_array_equal(out["a"], arr)
    assert list(out["o"]) == [None, 1]


def test_read_chunks_that_cannot_fit_are_refused(tmp_path, monkeypatch):
    """A chunk of wide rows must fit in memory: refused at planning, naming the file."""
    from forge_ray.data import resources

    path = tmp_path / "r.npz"
    np.savez(path, ids=np.arange(300), embeds=np.ones((300, 1024), np.float32))  # 4 KiB rows
    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 20)
    with pytest.raises(InputError, match=r"reading 300 rows of 1,024-d embeddings per task \(4.0 KiB "
                                         r"a row\) needs about 3.5 MiB of memory but only 1.0 MiB is "
                                         r"available; lower chunk_rows \(at most 85 rows fit\)") as err:
        sources.plan(path, "forge_reconstruct_npz", 65_536)
    _one_line(err, path)
    assert len(sources.plan(path, "forge_reconstruct_npz", 80)) == 4


def test_pickle_bigger_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    from forge_ray.data import resources

    path = tmp_path / "c.npz"
    _forge_contrastive(path, n=3000)
    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 10)
    with pytest.raises(InputError, match=r"member 'itemEncID' \(\d+\.\d KiB of pickle\) needs about") as err:
        npz.read_pickled(path, npz.members(path)["itemEncID"])
    _one_line(err, path)
