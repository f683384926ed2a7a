"""Ray commands through the CLI: ``--out``/``--overwrite`` never replace a user's
folder or the command's own input (one stderr line, files untouched)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge_ray.cli import main
from forge_ray.distributed.pipeline import claim_run_dir
from tests.conftest import REPO
from tests.unit.test_output_safety import _one_error_line, _tree, _user_folder

pytestmark = pytest.mark.ray

TINY = str(REPO / "configs" / "tiny" / "pipeline.yaml")


def _sids_dir(path):
    """A 3-item SIDS_DIR as assign writes it (one Parquet file and its manifest)."""
    path.mkdir()
    codes = pa.array([[0, 1], [1, 0], [1, 1]], pa.list_(pa.int64()))
    pq.write_table(pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "codes": codes,
                             "sid": codes, "fallback": [False] * 3}), path / "part-0.parquet")
    (path / "manifest.json").write_text(json.dumps(
        {"kind": "sids", "sizes": [2, 2], "code_sizes": [2, 2], "counts": {"items": 3}}))
    return path


def test_sid_metrics_output_may_not_be_its_input(ray_cluster, tmp_path, capsys):
    sids = _sids_dir(tmp_path / "sids")
    before = _tree(tmp_path)
    for out in (sids, sids / "metrics"):
        capsys.readouterr()
        assert main(["sid-metrics", "--sids", str(sids), "--out", str(out), "--overwrite",
                     "--address", ray_cluster.address]) == 2
        assert "the input" in _one_error_line(capsys, str(out))
        assert _tree(tmp_path) == before


def test_pipeline_never_writes_into_a_users_folder(ray_cluster, tmp_path, capsys):
    user = _user_folder(tmp_path / "user")
    before = _tree(tmp_path)
    assert main(["pipeline", "--config", TINY, "--out", str(user), "until=synth",
                 "--address", ray_cluster.address]) == 2
    assert "not a forge_ray pipeline run folder" in _one_error_line(capsys, str(user))
    assert _tree(tmp_path) == before
    # a pipeline run folder whose synth/ is not a synth output: that stage refuses
    run = claim_run_dir(tmp_path / "run")
    _user_folder(run)
    mine = _tree(run / "synth")
    assert main(["pipeline", "--config", TINY, "--out", str(run), "until=synth",
                 "--address", ray_cluster.address]) == 2
    assert "replaces only a previous 'synthetic' output" in _one_error_line(capsys, str(run / "synth"))
    assert _tree(run / "synth") == mine and (run / "notes.txt").read_text() == "mine"
