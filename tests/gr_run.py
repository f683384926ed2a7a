"""A tiny but complete GR run folder built in-process (no Ray): dataset, quantizer,
SID table and an untrained GR model with manifests, as train-gr would leave them.

Used by the recommender, CLI and Serve tests: decoding is deterministic for fixed
weights, so an untrained model exercises every path without minutes of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from forge_ray.core.gr.models import GRModelConfig, build_model, save_model
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.core.quantize.rq_kmeans import RQKMeans
from forge_ray.core.sid.collisions import CollisionConfig, resolve_all
from forge_ray.data.schema import embedding_array
from forge_ray.io import write_manifest
from forge_ray.sid_table import codes_array

DIM = 8


@dataclass
class GRRun:
    root: Path
    dataset: Path
    quantizer: Path
    sids: Path
    model: Path
    item_ids: np.ndarray
    embeddings: np.ndarray

    def key(self, item_id: int) -> str:
        return f"A{item_id:05d}"


def write_dataset(folder: Path, item_ids: np.ndarray, emb: np.ndarray, keys: list[str]) -> Path:
    (folder / "items").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": item_ids, "embedding": embedding_array(emb.astype(np.float32)),
                             "item_key": keys}), folder / "items" / "part-00000.parquet")
    write_manifest(folder, "dataset", counts={"items": len(item_ids)}, embedding_dim=emb.shape[1],
                   embedding_dtype="float32")
    return folder


def make_gr_run(root: Path, arch: str = "t5", n_items: int = 60, sizes=(4, 4), seed: int = 0) -> GRRun:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, DIM))
    emb = (centres[rng.integers(0, 6, n_items)] + 0.3 * rng.normal(size=(n_items, DIM))).astype(np.float32)
    ids = np.arange(n_items, dtype=np.int64) * 7 + 100
    run = GRRun(root, root / "ingest", root / "train_sid", root / "assign", root / "train_gr", ids, emb)
    write_dataset(run.dataset, ids, emb, [run.key(i) for i in ids])

    q = RQKMeans(sizes=list(sizes), niter=3, seed=seed).fit(emb)
    q.save(run.quantizer)
    codes = q.encode(emb)
    coll = CollisionConfig(strategy="suffix", seed=seed)
    sids, stats = resolve_all(ids, codes, None, coll, last_size=sizes[-1])
    sid_sizes = [*sizes, stats["suffix_size"]]
    run.sids.mkdir()
    pq.write_table(pa.table({"item_id": ids, "codes": codes_array(codes), "sid": codes_array(sids),
                             "fallback": np.zeros(n_items, bool)}), run.sids / "part-00000.parquet")
    write_manifest(run.sids, "sids", model=str(run.quantizer), dataset=str(run.dataset), sizes=sid_sizes,
                   code_sizes=list(sizes), strategy="suffix", collisions=json.loads(json.dumps(coll.__dict__)),
                   counts={"input_items": n_items, "items": n_items, "distinct_items": n_items})

    vocab = SIDVocab(tuple(sid_sizes))
    torch.manual_seed(seed)
    model = build_model(GRModelConfig(arch=arch, preset="tiny"), vocab)
    save_model(model, vocab, run.model, num_beams=8)
    write_manifest(run.model, "gr_model", arch=arch, sizes=sid_sizes, data=str(run.dataset), sids=str(run.sids),
                   config={"data": {"max_history": 5}}, counts={}, steps=0, best={})
    return run
