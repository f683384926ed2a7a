"""forge-ray sid-metrics on a real Ray cluster, checked against the core metric
functions computed in-process on the same data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from tests.ray.test_assign import make_dataset, read_out, tiny  # noqa: F401  (tiny is a fixture)

from forge_ray.config import load_config
from forge_ray.core.quantize.registry import load_quantizer
from forge_ray.core.sid.metrics import (SidMetricsConfig, embedding_hitrate, level_counts,
                                        reconstruction_mse, sid_counts, sid_quality)
from forge_ray.distributed.assign import AssignConfig, assign
from forge_ray.distributed.sid_metrics import SidMetricsStageConfig, sid_metrics
from forge_ray.errors import InputError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sids(ray_cluster, tiny, tmp_path_factory):  # noqa: F811
    data, model, _, _ = tiny
    out = tmp_path_factory.mktemp("metrics") / "sids"
    cfg = load_config(AssignConfig, None, ["collisions.strategy=cap", "collisions.cap=3",
                                           "collisions.candidates=8", "export=false"])
    assign(model, data, out, cfg)
    return out


@pytest.mark.slow  # several Ray Data shuffles: minutes on 2 shared cores
def test_metrics_match_core(ray_cluster, tiny, sids, tmp_path):  # noqa: F811
    data, model, x, ids = tiny
    cfg = load_config(SidMetricsStageConfig, None, ["hitrate.topk=5", "pool.batch_size=64"])
    m = sid_metrics(sids, data, tmp_path / "m", cfg)
    assert json.loads((tmp_path / "m/metrics.json").read_text())["gini"] == m["gini"]
    for png in ("sid_distribution.png", "sid_distribution_raw.png", "code_usage.png"):
        assert (tmp_path / "m" / png).stat().st_size > 1000
    got_ids, codes, sid = read_out(sids, 3, 3)
    raw = sid_quality(sid_counts(codes), level_counts(codes, [8, 8, 8]))
    final = sid_quality(sid_counts(sid), level_counts(sid, [8, 8, 8]))
    assert m["raw_collision_rate"] == pytest.approx(raw["collision_rate"]) and raw["collision_rate"] > 0
    for k in ("unique_sid_ratio", "max_items_per_sid", "gini", "utilization", "perplexity"):
        assert m[k] == pytest.approx(final[k]), k
        assert m["raw"][k] == pytest.approx(raw[k]), k
    q = load_quantizer(model)
    order = np.argsort(ids)
    assert m["reconstruction_mse"] == pytest.approx(reconstruction_mse(x[order], q.decode(sid)), rel=1e-5)
    assert m["raw_reconstruction_mse"] == pytest.approx(reconstruction_mse(x[order], q.decode(codes)), rel=1e-5)
    seqs = pq.read_table(data / "sequences").to_pydict()
    hist = [s[:-1] for s in seqs["item_ids"]]
    want = embedding_hitrate(got_ids, q.decode(sid), hist, np.array([s[-1] for s in seqs["item_ids"]]),
                             SidMetricsConfig(topk=5))
    got = m["embedding_hitrate@5"]
    for k in ("hitrate", "hits", "sessions", "skipped_no_history", "skipped_unknown_target", "gallery"):
        assert got[k] == pytest.approx(want[k]), k
    assert want["sessions"] > 0
    assert m["sequences"] == {"sequences": 40, "with_unknown_items": 1, "unknown_item_refs": 1}
    assert m["sids_of_unknown_items"] == 0


@pytest.mark.slow
def test_items_without_sid_is_an_error(ray_cluster, tiny, sids, tmp_path):  # noqa: F811
    data, _, x, ids = tiny
    bigger = make_dataset(tmp_path / "bigger", n_items=310, users=3, unknown_ref=None)
    with pytest.raises(InputError, match="items of .* have no SID"):
        sid_metrics(sids, bigger, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_an_item_named_twice_is_an_error(ray_cluster, sids, tmp_path):
    """Counted by the task shuffle: a part copied under a second name names its items twice."""
    copy = tmp_path / "sids"
    shutil.copytree(sids, copy)
    first = sorted(copy.glob("*.parquet"))[0]
    shutil.copy(first, copy / "part-99999.parquet")
    with pytest.raises(InputError, match="SID table names some item more than once"):
        sid_metrics(copy, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()
