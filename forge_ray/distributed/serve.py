"""Ray Serve deployment of a GR model: ``POST /recommend {"history": [...], "k": 10}``.

Each replica holds one :class:`~forge_ray.serving.recommender.Recommender` (model,
trie, item tables; on its GPU when ``gpus_per_replica`` > 0). Requests are parsed and
checked one by one (a malformed one gets a 4xx with a message and never reaches the
model), then queued into ``@serve.batch`` so concurrent requests share one batched
beam search. Answer::

    {"items": [item ids], "keys": [source keys], "scores": [SID log-probs],
     "unknown": [history entries skipped]}

Python callers and other deployments can skip HTTP: ``handle.recommend.remote(body)`` on
the app's handle gives the same answer as a dict. ``GET /stats`` gives the replica's
request and batch counts (how full its batches are).

The proxy binds to loopback (``host`` 127.0.0.1) unless configured otherwise. Started
by ``forge-ray serve --model GR_DIR`` (several folders: one ensemble, as the
Recommender) or, with a Serve config file, ``serve run
configs/serve/recommend.yaml`` / ``serve deploy`` (see :func:`app_builder`).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from forge_ray.config import require, to_dict
from forge_ray.core.gr.models import model_dirs
from forge_ray.errors import InputError

MAX_HISTORY_ENTRIES = 10_000  # a request with more entries is refused, not decoded


@dataclass
class ServeConfig:
    """Replicas, batching and where the HTTP proxy listens.

    replicas / cpus_per_replica / gpus_per_replica: the deployment's replicas and
        what each reserves (a GPU replica decodes on its GPU).
    max_batch_size / batch_wait_timeout_s: ``@serve.batch`` settings: up to this
        many requests per beam search, waiting at most this long (seconds) to fill it.
    max_k: largest ``k`` a request may ask for.
    host / port: the HTTP proxy (loopback by default).
    proxy_location: ``HeadOnly`` (one proxy) or ``EveryNode``.
    """

    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 256
    max_k: int = 100
    host: str = "127.0.0.1"
    port: int = 8000
    proxy_location: str = "HeadOnly"

    def __post_init__(self):
        require(self.replicas >= 1, "replicas must be >= 1")
        require(self.cpus_per_replica > 0 and self.gpus_per_replica >= 0,
                "cpus_per_replica must be > 0 and gpus_per_replica >= 0")
        require(self.max_batch_size >= 1 and self.batch_wait_timeout_s >= 0,
                "max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        require(self.max_ongoing_requests >= self.max_batch_size,
                "max_ongoing_requests must be >= max_batch_size (or batches never fill)")
        require(self.max_k >= 1, "max_k must be >= 1")
        require(1 <= self.port <= 65535, "port must be in [1, 65535]")
        require(self.proxy_location in ("HeadOnly", "EveryNode"), "proxy_location must be HeadOnly or EveryNode")


class BadRequest(ValueError):
    """A request the replica refuses (answered 400 with this message)."""


def parse_request(body: Any, max_k: int) -> tuple[list[str], int]:
    """JSON body -> (history keys, k); BadRequest on anything else."""
    if not isinstance(body, dict):
        raise BadRequest('expected a JSON object {"history": [...], "k": 10}')
    unknown = sorted(set(body) - {"history", "k"})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}: expected 'history' and optional 'k'")
    history = body.get("history")
    if not isinstance(history, list) or not history:
        raise BadRequest("'history' must be a non-empty list of item keys")
    if len(history) > MAX_HISTORY_ENTRIES:
        raise BadRequest(f"'history' has {len(history)} entries, more than {MAX_HISTORY_ENTRIES}")
    if not all(isinstance(h, (str, int)) and not isinstance(h, bool) for h in history):
        raise BadRequest("'history' entries must be strings or integers (item keys)")
    k = body.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise BadRequest(f"'k' must be an integer in [1, {max_k}]")
    return [str(h) for h in history], k


@serve.deployment
class RecommenderDeployment:
    """One replica: a Recommender behind ``@serve.batch``."""

    def __init__(self, model_dirs: list[str], sids: str | None, cfg: dict):
        import torch

        from forge_ray.serving.recommender import Recommender

        self.cfg = ServeConfig(**cfg)
        # torch would start one thread per core of the machine, not per reserved CPU
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_replica)))
        device = "cuda" if self.cfg.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.rec = Recommender.from_dir(model_dirs, sids=sids, device=device,
                                        batch_size=self.cfg.max_batch_size)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.requests = self.batches = 0  # GET /stats: how full the batches are

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _batched(self, queries: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Known-item histories -> (items, scores) each; one beam search per beam width
        (``max(num_beams, k)``), so a request's answer never depends on its batch-mates."""
        self.requests, self.batches = self.requests + len(queries), self.batches + 1
        width = [max(self.rec.num_beams, k) for _, k in queries]
        out: list = [None] * len(queries)
        for w in sorted(set(width)):
            rows = [i for i, x in enumerate(width) if x == w]
            kmax = max(queries[i][1] for i in rows)
            # the search runs in a thread so the replica keeps queueing the next batch
            ranked = await asyncio.to_thread(self.rec.recommend_ids, [queries[i][0] for i in rows], kmax)
            for i, (items, scores) in zip(rows, ranked):
                out[i] = (items[: queries[i][1]], scores[: queries[i][1]])
        return out

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path.rstrip("/").endswith("/stats") and request.method == "GET":
            return JSONResponse({"requests": self.requests, "batches": self.batches,
                                 "mean_batch": self.requests / max(self.batches, 1)})
        if not request.url.path.rstrip("/").endswith("/recommend"):
            return JSONResponse({"error": f"no route {request.url.path}; POST /recommend"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "use POST /recommend"}, status_code=405)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        try:
            return JSONResponse(await self.recommend(body))
        except (BadRequest, InputError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    async def recommend(self, body: Any) -> dict:
        """The answer to one request body, also for ``DeploymentHandle`` callers
        (``handle.recommend.remote({"history": [...], "k": 10})``: other deployments,
        Python clients), who skip the HTTP proxy. BadRequest / InputError on bad input."""
        history, k = parse_request(body, self.cfg.max_k)
        ids, unknown = self.rec.resolve(history, "request")
        items, scores = await self._batched((ids, k))
        return self.rec.answer(items, scores, unknown).to_dict()


def build_app(model_dir: str | os.PathLike | Sequence[str | os.PathLike],
              sids: str | os.PathLike | None = None, cfg: ServeConfig | None = None):
    """The bound Serve application (not yet running); a list of model folders serves
    them as one ensemble."""
    cfg = cfg or ServeConfig()
    options = {"num_cpus": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        options["num_gpus"] = cfg.gpus_per_replica
    deployment = RecommenderDeployment.options(
        num_replicas=cfg.replicas, ray_actor_options=options,
        max_ongoing_requests=cfg.max_ongoing_requests)
    return deployment.bind([os.fspath(d.resolve()) for d in model_dirs(model_dir)],
                           None if sids is None else os.fspath(os.path.abspath(sids)), to_dict(cfg))


def app_builder(args: dict[str, Any]):
    """Builder for ``serve run`` / ``serve deploy`` config files: ``args`` holds
    ``model`` (GR_DIR, or a list of them: an ensemble), optional ``sids`` and any :class:`ServeConfig` field
    (host/port belong to the file's ``http_options``)."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise InputError("serve config", "args.model (the GR_DIR to serve) is required")
    sids = args.pop("sids", None)
    return build_app(model, sids, ServeConfig(**args))


def start(model_dir: str | os.PathLike | Sequence[str | os.PathLike], sids: str | os.PathLike | None, cfg: ServeConfig,
          name: str = "forge_ray") -> str:
    """Start Serve on the connected cluster with the proxy on ``cfg.host:cfg.port`` and
    run the app; returns the URL of ``/recommend``. Needs a Ray connection."""
    serve.start(proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(model_dir, sids, cfg), name=name, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}/recommend"
