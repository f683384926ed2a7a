"""The Ray Serve deployment, over real HTTP on loopback, against the in-process Recommender."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest

from forge_ray.serving.recommender import Recommender
from tests.gr_run import make_gr_run

pytestmark = pytest.mark.ray
PORT = 18431


def post(body: bytes | dict, path: str = "/recommend", method: str = "POST") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data if method == "POST" else None,
                                 method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    from forge_ray.distributed.serve import ServeConfig, start

    run = make_gr_run(tmp_path_factory.mktemp("gr"))
    url = start(run.model, None, ServeConfig(port=PORT, cpus_per_replica=0.5, max_batch_size=8,
                                             batch_wait_timeout_s=0.02))
    assert url == f"http://127.0.0.1:{PORT}/recommend"
    yield run
    serve.shutdown()


def test_answers_equal_the_in_process_recommender_under_concurrency(served):
    rec = Recommender.from_dir(served.model)
    histories = [[served.key(i) for i in served.item_ids[s:s + 3]] for s in range(0, 48, 3)]
    expected = rec.recommend(histories, k=5)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests share batches in the replica
        answers = list(pool.map(lambda h: post({"history": h, "k": 5}), histories))
    for (status, got), want in zip(answers, expected):
        assert status == 200 and got["items"] == want.items and got["keys"] == want.keys
        assert np.allclose(got["scores"], want.scores, atol=1e-4)
    status, again = post({"history": histories[0], "k": 5})  # the same request, the same answer
    assert status == 200 and again["items"] == answers[0][1]["items"]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    ({"k": 5}, "'history' must be a non-empty list"),
    ({"history": [], "k": 5}, "'history' must be a non-empty list"),
    ({"history": [["nested"]]}, "entries must be strings or integers"),
    ({"history": ["A00100"], "k": 0}, "'k' must be an integer in [1, 100]"),
    ({"history": ["A00100"], "k": "ten"}, "'k' must be an integer"),
    ({"history": ["A00100"], "user": 3}, "unknown field(s) ['user']"),
    ({"history": ["nobody", "knows"]}, "no known item in the history (2 unknown: nobody, knows)"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_malformed_requests_get_400_and_the_replica_keeps_serving(served, body, message):
    status, got = post(body)
    assert status == 400 and message in got["error"]
    status, ok = post({"history": [served.key(served.item_ids[0])], "k": 3})
    assert status == 200 and len(ok["items"]) == 3


def test_deployment_handle_gives_the_http_answer(served):
    from ray import serve

    body = {"history": [served.key(i) for i in served.item_ids[3:6]], "k": 4}
    status, over_http = post(body)
    assert status == 200 and serve.get_app_handle("forge_ray").recommend.remote(body).result() == over_http


def test_other_routes_and_methods(served):
    assert post({}, path="/nothing")[0] == 404
    assert post(b"", method="GET")[0] == 405
    status, stats = post(b"", path="/stats", method="GET")
    assert status == 200 and stats["requests"] >= stats["batches"] >= 1


def test_proxy_listens_on_loopback_only(served):
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == PORT]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
