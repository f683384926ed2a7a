"""Serving benchmark: Ray Serve ``POST /recommend`` vs the in-process Recommender, same requests.

Baseline (in this process): ``Recommender.recommend`` on batches of ``--batch`` histories
(the ceiling: no HTTP, no queueing), and one history at a time (latency per request).
Then the same requests through a local Ray Serve app (one replica, ``@serve.batch`` up to
``--batch``) from 1, 8 and 64 concurrent HTTP clients (threads with keep-alive
connections): requests/s and p50/p99 latency. Torch uses ``--threads`` threads in both.

A trivial deployment (parse the JSON, answer it) on the same proxy shows what Ray
Serve's HTTP path itself allows on this machine, and the same requests through the app's
``DeploymentHandle`` (``handle.recommend.remote``, no HTTP proxy) show what the replica's
batching gives without it. Checks printed with the numbers: every recommended item exists in the SID table
(invalid rate 0) and every Serve answer equals the in-process answer to the same history.

    make demo && python bench/bench_serve.py --model demo_out/train_gr
    python bench/bench_serve.py --model demo_out/train_gr --requests 256 --quick
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import forge_ray  # noqa: F401  (loopback before ray is imported)
from forge_ray.serving.recommender import Recommender

PORT = 18777


def histories(rec: Recommender, n: int, seed: int = 0) -> list[list[str]]:
    """``n`` real histories (item keys) from the model's dataset, oldest first."""
    ds = rec.table.datasets[0]
    files = sorted(glob.glob(str(ds / "sequences" / "*.parquet")))
    seqs = [s for f in files for s in pq.read_table(f, columns=["item_ids"])["item_ids"].to_pylist()]
    rng = np.random.default_rng(seed)
    picked = [seqs[i] for i in rng.choice(len(seqs), size=n, replace=len(seqs) < n)]
    return [rec.keys.to_keys(np.asarray(s[:-1] or s, np.int64)) for s in picked]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def in_process(rec: Recommender, hs: list[list[str]], k: int, batch: int) -> dict:
    rec.recommend(hs[:batch], k)  # warm-up
    t = time.perf_counter()
    answers = [r for s in range(0, len(hs), batch) for r in rec.recommend(hs[s:s + batch], k)]
    batched = time.perf_counter() - t
    lat = []
    for h in hs[: max(32, len(hs) // 8)]:
        t = time.perf_counter()
        rec.recommend([h], k)
        lat.append(time.perf_counter() - t)
    return {"answers": answers, "batched_rps": len(hs) / batched, "single_rps": len(lat) / sum(lat),
            "p50": pct(lat, 50), "p99": pct(lat, 99)}


def through_serve(hs: list[list[str]], k: int, clients: int, route: str = "/recommend") -> dict:
    def worker(chunk: list[tuple[int, list[str]]]):
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
        out = []
        for i, h in chunk:
            t = time.perf_counter()
            conn.request("POST", route, json.dumps({"history": h, "k": k}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            body = json.loads(r.read())
            out.append((i, r.status, body, time.perf_counter() - t))
        conn.close()
        return out

    chunks = [list(enumerate(hs))[c::clients] for c in range(clients)]
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(worker, chunks) for x in part]
    wall = time.perf_counter() - t
    results.sort(key=lambda x: x[0])
    lat = [x[3] for x in results]
    return {"answers": [x[2] for x in results], "statuses": [x[1] for x in results],
            "rps": len(hs) / wall, "p50": pct(lat, 50), "p99": pct(lat, 99)}


def through_handle(hs: list[list[str]], k: int, clients: int) -> dict:
    """The same requests from Python through the app's DeploymentHandle (no HTTP proxy),
    at most ``clients`` in flight."""
    import asyncio

    from ray import serve

    handle = serve.get_app_handle("forge_ray")

    async def run():
        gate, lat = asyncio.Semaphore(clients), []

        async def one(h):
            async with gate:
                t = time.perf_counter()
                answer = await handle.recommend.remote({"history": h, "k": k})
                lat.append(time.perf_counter() - t)
                return answer

        t = time.perf_counter()
        answers = await asyncio.gather(*(one(h) for h in hs))
        return answers, time.perf_counter() - t, lat

    answers, wall, lat = asyncio.run(run())
    return {"answers": answers, "rps": len(hs) / wall, "p50": pct(lat, 50), "p99": pct(lat, 99)}


def _get(path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo_out/train_gr", help="GR_DIR (make demo writes demo_out/train_gr)")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="in-process batch and Serve max_batch_size")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and per replica")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--gpu", action="store_true", help="a GPU replica and in-process on cuda")
    p.add_argument("--quick", action="store_true", help="clients 1 and 64 only")
    args = p.parse_args()
    if not (Path(args.model) / "manifest.json").is_file():
        raise SystemExit(f"{args.model}: no GR model there (run `make demo` or pass --model GR_DIR)")
    clients = [1, 64] if args.quick else args.clients
    torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    rec = Recommender.from_dir(args.model, device=device, batch_size=args.batch)
    hs = histories(rec, args.requests)
    base = in_process(rec, hs, args.k, args.batch)
    table_items = set(rec.table.arrays()[0].tolist())
    invalid = sum(i not in table_items for r in base["answers"] for i in r.items)

    import ray
    from ray import serve
    from starlette.responses import JSONResponse

    from forge_ray.distributed.serve import ServeConfig, start

    @serve.deployment(ray_actor_options={"num_cpus": args.threads}, max_ongoing_requests=256)
    class Echo:
        """The same HTTP + JSON path with no model: what the proxy alone allows."""

        async def __call__(self, request):
            body = await request.json()
            return JSONResponse({"items": body["history"][: body["k"]]})

    ray.init(address="local", num_cpus=4, num_gpus=1 if args.gpu else 0, include_dashboard=False,
             log_to_driver=False)
    try:
        start(args.model, None, ServeConfig(port=PORT, cpus_per_replica=args.threads,
                                            gpus_per_replica=1.0 if args.gpu else 0.0,
                                            max_batch_size=args.batch, batch_wait_timeout_s=0.01,
                                            max_ongoing_requests=max(256, 2 * max(clients))))
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        through_serve(hs[:16], args.k, 4)  # warm-up: replica loaded, proxy routes ready
        rows = []
        for c in clients:
            stats = _get("/stats")
            r = through_serve(hs, args.k, c)
            after = _get("/stats")
            r["mean_batch"] = (after["requests"] - stats["requests"]) / max(after["batches"] - stats["batches"], 1)
            same = sum(a.get("items") == b.items for a, b in zip(r["answers"], base["answers"]))
            rows.append((c, r, same))
        echo = through_serve(hs, args.k, clients[-1], route="/echo")
        stats = _get("/stats")
        by_handle = through_handle(hs, args.k, clients[-1])
        after = _get("/stats")
        by_handle["mean_batch"] = (after["requests"] - stats["requests"]) / max(after["batches"] - stats["batches"], 1)
        by_handle["same"] = sum(a["items"] == b.items for a, b in zip(by_handle["answers"], base["answers"]))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{args.requests} requests, k={args.k}, {args.threads} torch thread(s), {device}; "
          f"invalid recommended items in-process: {invalid}")
    print(f"{'path':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  {'same answer':>11}")
    print(f"{'in-process, batch ' + str(args.batch):<34}{base['batched_rps']:>9.1f}{'':>9}{'':>9}")
    print(f"{'in-process, one at a time':<34}{base['single_rps']:>9.1f}{base['p50']:>9.1f}{base['p99']:>9.1f}")
    for c, r, same in rows:
        ok = sum(s == 200 for s in r["statuses"])
        print(f"{f'Serve, {c} client(s)':<34}{r['rps']:>9.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}  "
              f"{same:>5}/{len(hs)}  ({ok} x 200, mean batch {r['mean_batch']:.1f})")
    h = by_handle
    print(f"{f'Serve handle (no HTTP), {clients[-1]} in flight':<34}{h['rps']:>9.1f}{h['p50']:>9.1f}{h['p99']:>9.1f}  "
          f"{h['same']:>5}/{len(hs)}  (mean batch {h['mean_batch']:.1f})")
    print(f"{f'Serve echo (no model), {clients[-1]} clients':<34}{echo['rps']:>9.1f}{echo['p50']:>9.1f}"
          f"{echo['p99']:>9.1f}  (the proxy path's own ceiling here)")
    top = rows[-1]
    print(f"\nServe at {top[0]} clients / in-process batched: {top[1]['rps'] / base['batched_rps']:.2f}x "
          f"(target >= 0.7x); echo / in-process batched: {echo['rps'] / base['batched_rps']:.2f}x; "
          f"handle / in-process batched: {h['rps'] / base['batched_rps']:.2f}x")


if __name__ == "__main__":
    main()
