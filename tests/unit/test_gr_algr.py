"""AL-GR format: read FORGE's real sample, write/read round trips, clear errors."""

import numpy as np
import pytest

from forge_ray.core.gr import algr
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.errors import InputError

VOCAB = SIDVocab((8192, 8192, 8192))


def test_read_real_sample(shared_data):
    path = shared_data / "algr" / "train_data_sample.tsv"
    batches = list(algr.read_algr(path, VOCAB, answer="sid"))
    rows = sum(len(b["id"]) for b in batches)
    assert rows == 10
    b = batches[0]
    assert b["id"][0] == "0001ab79-88a4-415a-ab07-0988d41bb774"
    assert VOCAB.ids_to_text(b["labels"][0]) == "C1442C14117C19114"
    first = b["input_ids"][0]
    assert VOCAB.ids_to_text(first[:6]) == "C1989C14585C22548C6175C12563C20444"
    assert first[-1] == VOCAB.eos_id and (len(first) - 1) % 3 == 0
    # every history token sits at its level (C0..8191, C8192.., C16384..)
    codes = VOCAB.ids_to_codes(first[:-1].reshape(-1, 3))
    assert (codes >= 0).all()


def test_train_rows_round_trip_byte_for_byte(shared_data, tmp_path):
    src = shared_data / "algr" / "train_data_sample.tsv"
    out = tmp_path / "copy.tsv"
    n = algr.write_algr(out, algr.read_algr(src, VOCAB, answer="sid"), VOCAB)
    assert n == 10
    # identical up to the final newline (the sample file has none)
    assert out.read_text(encoding="utf-8") == src.read_text(encoding="utf-8").rstrip("\n") + "\n"


def test_test_rows_round_trip(tmp_path):
    batch = {"id": np.array(["a", "b"], dtype=object),
             "input_ids": np.array([np.append(VOCAB.codes_to_ids(np.array([[1, 2, 3], [4, 5, 6]])).reshape(-1), 1),
                                    np.append(VOCAB.codes_to_ids(np.array([[7, 8, 9]])).reshape(-1), 1)],
                                   dtype=object),
             "target_items": np.array([np.array([855036080309, 12]), np.array([3])], dtype=object)}
    path = tmp_path / "test.tsv"
    algr.write_algr(path, [batch], VOCAB)
    line = path.read_text(encoding="utf-8").splitlines()[1].split("\t")
    assert line[3] == "855036080309;12" and "C1C8194C16387C4C8197C16390" in line[2]
    (back,) = list(algr.read_algr(path, VOCAB, answer="items"))
    assert back["id"].tolist() == ["a", "b"]
    for got, want in zip(back["input_ids"], batch["input_ids"]):
        np.testing.assert_array_equal(got, want)
    assert [t.tolist() for t in back["target_items"]] == [[855036080309, 12], [3]]


def test_bad_files_give_one_line_errors(tmp_path):
    bad_header = tmp_path / "h.tsv"
    bad_header.write_text("id\tuser\tanswer\n1\tC1\tC2\n")
    with pytest.raises(InputError, match="h.tsv: header"):
        list(algr.read_algr(bad_header, VOCAB, answer="sid"))
    bad_answer = tmp_path / "a.tsv"
    bad_answer.write_text("id\tsystem\tuser\tanswer\nr7\tsys\thist:C1C8193C16385\tC1C8193\n")
    with pytest.raises(InputError, match=r"a.tsv: row r7: answer: 2 tokens is not a multiple of 3"):
        list(algr.read_algr(bad_answer, VOCAB, answer="sid"))
    bad_level = tmp_path / "l.tsv"
    bad_level.write_text("id\tsystem\tuser\tanswer\nr8\tsys\thist:C1C2C16385\t1;2\n")
    with pytest.raises(InputError, match="row r8: user field: code outside"):
        list(algr.read_algr(bad_level, VOCAB, answer="items"))
    no_items = tmp_path / "e.tsv"
    no_items.write_text("id\tsystem\tuser\tanswer\nr9\tsys\thist:C1C8193C16385\t;\n")
    with pytest.raises(InputError, match="e.tsv: row r9: answer holds no item ids"):
        list(algr.read_algr(no_items, VOCAB, answer="items"))


def test_token_beyond_int64_and_bad_rows_are_one_line_errors(tmp_path):
    from forge_ray.core.sid.codes import parse_sid_sequence

    with pytest.raises(ValueError, match="exceeds int64"):
        parse_sid_sequence("C99999999999999999999999C8193C16385", VOCAB.sizes)
    path = tmp_path / "a.tsv"
    path.write_text("id\tsystem\tuser\tanswer\nu1\ts\tC99999999999999999999999C8193C16385\tC1C8193C16385\n")
    with pytest.raises(InputError, match="row u1: user field: a C-token number exceeds int64"):
        list(algr.read_algr(path, VOCAB, "sid"))
    path.write_text("id\tsystem\tuser\tanswer\nu1\ts\tC1C8193C16385\t1;99999999999999999999\n")
    with pytest.raises(InputError, match="row u1: answer '1;9+' is not ';'-separated item ids"):
        list(algr.read_algr(path, VOCAB, "items"))
    for body in (b"u1\ts\tC1C8193C16385\n", b"u1\ts\t\xff C1C8193C16385\tC1C8193C16385\n"):
        path.write_bytes(b"id\tsystem\tuser\tanswer\n" + body)  # 3 fields; not UTF-8
        with pytest.raises(InputError, match="malformed AL-GR row") as err:
            list(algr.iter_algr(path))
        assert "\n" not in str(err.value) and str(err.value).startswith(str(path))
