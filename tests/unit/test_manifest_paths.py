"""Manifests link sibling stage outputs relatively: a run folder moved whole with ``mv``
still finds its inputs; a path outside the run folder stays absolute."""

from __future__ import annotations

import json
import shutil

import numpy as np

from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.quantize.rq_kmeans import RQKMeans, RQKMeansConfig
from forge_ray.io import atomic_dir, manifest_path, read_manifest, write_manifest
from forge_ray.sid_table import SIDS_KIND


def test_a_moved_run_folder_still_finds_its_inputs(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere" / "ds"
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    RQKMeans(RQKMeansConfig(sizes=[4, 4], niter=2, init_niter=2)).fit(x).save(run / "model")
    write_manifest(run / "model", "quantizer", quantizer="rq_kmeans")
    (run / "dataset").mkdir()
    with atomic_dir(run / "sids", kind=SIDS_KIND) as tmp:  # written in a temporary sibling
        given = write_manifest(tmp, SIDS_KIND, model=str(run / "model"), dataset=str(run / "dataset"),
                               datasets=[str(run / "dataset"), str(elsewhere)], sizes=[4, 4])
    on_disk = json.loads((run / "sids" / "manifest.json").read_text())
    assert on_disk["model"] == "../model" and on_disk["dataset"] == "../dataset"
    assert on_disk["datasets"] == ["../dataset", str(elsewhere)]  # outside the run: absolute
    assert read_manifest(run / "sids") == given

    moved = tmp_path / "moved" / "run2"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    m = read_manifest(moved / "sids", SIDS_KIND)
    assert m["model"] == str(moved / "model") and m["datasets"] == [str(moved / "dataset"), str(elsewhere)]
    assert load_quantizer(m["model"]).sizes == [4, 4]  # the reader finds its input
    assert manifest_path(moved / "sids", "../dataset") == moved / "dataset"
    assert manifest_path(moved / "sids", None) is None
