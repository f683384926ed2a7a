"""SID plots write real PNGs; exports round-trip."""

import numpy as np
import pyarrow as pa
import pytest

from forge_ray.core.sid.export import (SidTableWriter, SidTokenWriter, read_sid_table,
                                       read_sid_tokens)
from forge_ray.core.sid.metrics import level_counts, sid_counts
from forge_ray.core.sid.plots import plot_code_usage, plot_sid_distribution
from forge_ray.errors import InputError

SIZES = [8, 8, 16]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _codes(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n) for k in SIZES], axis=1)


def test_plots_write_pngs(tmp_path):
    codes = _codes()
    plot_sid_distribution(sid_counts(codes), tmp_path / "dist.png")
    plot_code_usage(level_counts(codes, SIZES), tmp_path / "usage.png")
    plot_sid_distribution(np.r_[np.ones(5, int), 300], tmp_path / "skewed.png")  # wide bins
    for name in ("dist.png", "usage.png", "skewed.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_sid_table_round_trip_in_batches(tmp_path):
    codes = _codes()
    ids = np.arange(855036080309, 855036080309 + len(codes))
    path = tmp_path / "sid_table.csv"
    with SidTableWriter(path, SIZES) as w:
        w.write(ids[:50], codes[:50])
        w.write(pa.table({"item_id": ids[50:120], "codes": pa.array(codes[50:120].tolist())}))
        w.write(pa.record_batch({"item_id": ids[120:], "c1": codes[120:, 0],
                                 "c2": codes[120:, 1], "c3": codes[120:, 2]}))
    assert w.rows == len(ids)
    assert path.read_text().splitlines()[0] == "item_id,c1,c2,c3"
    r_ids, r_codes = read_sid_table(path, SIZES)
    assert (r_ids == ids).all() and (r_codes == codes).all()

    tok = tmp_path / "tokens_table.csv"
    with SidTableWriter(tok, SIZES, tokens=True) as w:
        w.write(ids, codes)
    first = tok.read_text().splitlines()[1].split(",")
    assert [int(v) for v in first[1:]] == [codes[0, 0], codes[0, 1] + 8, codes[0, 2] + 16]
    assert (read_sid_table(tok, SIZES, tokens=True)[1] == codes).all()


def test_sid_tokens_round_trip(tmp_path):
    codes = _codes(30, seed=1)
    ids = np.arange(30) * 7
    path = tmp_path / "sid_tokens.csv"
    with SidTokenWriter(path, SIZES) as w:
        w.write(ids[:10], codes[:10])
        w.write(ids[10:], codes[10:])
    row = path.read_text().splitlines()[1]
    assert path.read_text().splitlines()[0] == "item_id,sid"
    assert row == f"0,C{codes[0, 0]}C{codes[0, 1] + 8}C{codes[0, 2] + 16}"
    r_ids, r_codes = read_sid_tokens(path, SIZES)
    assert (r_ids == ids).all() and (r_codes == codes).all()


def test_export_rejects_bad_codes_and_files(tmp_path):
    with SidTableWriter(tmp_path / "x.csv", SIZES) as w:
        with pytest.raises(ValueError, match="codebook"):
            w.write([1], [[0, 0, 16]])
        with pytest.raises(ValueError, match="do not match"):
            w.write([1, 2], [[0, 0, 1]])
    bad = tmp_path / "bad.csv"
    bad.write_text("item,c1,c2,c3\n1,0,0,0\n")
    with pytest.raises(InputError, match="bad.csv: header is item,c1,c2,c3"):
        read_sid_table(bad, SIZES)
    bad.write_text("item_id,c1,c2,c3\n1,0,9,0\n")
    with pytest.raises(InputError, match="outside its level"):
        read_sid_table(bad, SIZES)
    bad.write_text("item_id,sid\n1,C1C2\n")
    with pytest.raises(InputError, match="row 1"):
        read_sid_tokens(bad, SIZES)
    with pytest.raises(InputError, match="file not found"):
        read_sid_table(tmp_path / "missing.csv", SIZES)
