"""`forge-ray recommend` and `forge-ray add-items` from the command line (no Ray needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forge_ray.cli import main
from tests.gr_run import make_gr_run, write_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_gr_run(tmp_path_factory.mktemp("gr"))


def test_history_flag_prints_one_json_line(run, capsys):
    keys = [run.key(i) for i in run.item_ids[:3]]
    assert main(["recommend", "--model", str(run.model), "--history", *keys, "nope", "-k", "4"]) == 0
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    answer = json.loads(line)
    assert len(answer["items"]) == 4 and answer["keys"] == [run.key(i) for i in answer["items"]]
    assert answer["unknown"] == ["nope"] and "--history: skipped 1 unknown item(s): nope" in err


def test_input_file_one_line_per_history_and_errors_name_the_line(run, tmp_path, capsys):
    f = tmp_path / "histories.txt"
    f.write_text(f"{run.key(run.item_ids[0])} {run.key(run.item_ids[1])}\n\n{run.key(run.item_ids[2])}\n")
    assert main(["recommend", "--model", str(run.model), "--input", str(f), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["history"] for x in lines] == [0, 1]
    f.write_text(f"{run.key(run.item_ids[0])}\nonly unknown keys\n")
    assert main(["recommend", "--model", str(run.model), "--input", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"{f} line 2: no known item in the history (3 unknown: only, unknown, keys)" in err


def test_not_a_model_folder_is_one_line(run, capsys):
    assert main(["recommend", "--model", str(run.sids), "--history", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a 'gr_model' output" in err


def test_add_items_then_recommend_with_the_new_table(run, tmp_path, capsys):
    new = write_dataset(tmp_path / "new", np.array([777_777]), run.embeddings[:1] + 0.01, ["NEW-1"])
    out = tmp_path / "sids_v2"
    assert main(["add-items", "--sids", str(run.sids), "--data", str(new), "--out", str(out)]) == 0
    assert "added 1 items" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "export" / "sid_table").iterdir()) == ["part-00000.csv", "part-00001.csv"]
    assert main(["recommend", "--model", str(run.model), "--sids", str(out), "--history", "NEW-1", "-k", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown"] == []
    # the same command again: refused (the output exists), nothing changed
    assert main(["add-items", "--sids", str(run.sids), "--data", str(new), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
