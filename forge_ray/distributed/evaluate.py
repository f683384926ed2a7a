"""``forge-ray eval-gr``: constrained beam search over the test split, in Ray Data actors.

Each actor (a small callable class, fractional CPUs, ``ActorPoolStrategy``) loads the
saved model and the SID trie once, decodes batches of queries with
:func:`~forge_ray.core.gr.decoding.generate_sids`, and returns the summed metric
state of each batch (:class:`~forge_ray.core.gr.metrics.RetrievalMetrics`); the
driver merges the sums, so the result is the mean over every query, the same as a
single-process run up to float summation order.

``--data`` may instead be an AL-GR test TSV (FORGE's released test files): its rows
are the queries as given (history SID tokens; ``;``-separated true item ids, several
per query allowed), and the SID table supplies the trie that maps generated SIDs to
items. Such a file holds no training interactions, so no popularity baseline.

Baselines are scored on the same queries with the same metrics, so a report shows at
once whether GR earns its cost:

- most-popular: item counts over each user's training part, the items the model was
  trained on (all but the last ``data.train_holdout`` of its manifest, 2 unless it is a
  refit, of the raw sequence) come from a distributed ``groupby(item_id).count()`` and
  a distributed sort; only the top ``max_k`` rows reach the driver;
- content kNN (:mod:`forge_ray.core.gr.knn`) on the dataset's item embeddings, the
  ones the SIDs were quantised from: cosine neighbours of the last history item and of
  the history's mean, history items excluded. Every actor holds the index (4 x D
  bytes per item), so it runs only when that fits ``knn_max_mb``.

GR and most-popular leave each query's history items out of their rankings when the
model's training data shows users do not come back to items (``exclude_history``;
:mod:`forge_ray.core.gr.ranking`), the kNN baselines always do.

``--model`` alone is enough: the data and SID table come from the model's manifest.
Several ``--model`` folders (the same config trained with other seeds, on the same SID
table) are decoded as one ensemble: the beam search scores the mean of their
next-token probabilities (:class:`~forge_ray.core.gr.decoding.EnsembleStep`); the
first folder's manifest supplies the data, the SIDs and the history rule.

Cut-offs: an item list holds the items of the ``num_beams`` returned SIDs in beam
order, so Recall/HR@K for K above that many items counts the missing ranks as
misses (set ``num_beams`` >= the largest K for FORGE's HR@1000; every SID holds at
least one item). Memory per actor: the model, the trie (8 x (L + 1) bytes per item)
and one batch's (batch x beams, vocab) logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data

from forge_ray.config import require, to_dict
from forge_ray.core.gr.data import REPEAT_RATE_MAX, ExampleCounts, ItemSIDTable, history_excluded, prompt_eos
from forge_ray.core.gr.metrics import RetrievalMetrics
from forge_ray.core.gr.models import MODEL_KIND, check_same_kind, model_dirs
from forge_ray.core.gr.popularity import PopularityCounter
from forge_ray.core.gr.ranking import drop_items
from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.distributed import gr_data
from forge_ray.distributed.dataset import dataset_manifest, partitions_for, read_sequences
from forge_ray.distributed.remote_errors import surface_user_errors
from forge_ray.errors import InputError
from forge_ray.io import atomic_dir, check_output, read_manifest, write_manifest

EVAL_KIND = "gr_eval"
KNN_QUERIES = {"last_item": "last", "history_mean": "mean"}  # report name -> ContentKNN query


@dataclass
class EvalGRConfig:
    """What ``forge-ray eval-gr`` scores and how it spreads the work.

    batch_size: queries per decode call (one actor's batch).
    actors / cpus_per_actor / gpus_per_actor: the decoding pool (keep CPUs fractional:
        1-CPU actors can starve Ray Data's read tasks on small machines).
    max_queries: score only the first N queries (0 = all).
    popularity / content_knn: score those baselines beside GR (see module doc).
    exclude_history: leave each query's history items out of the GR and most-popular
        rankings; ``auto`` does when the model's training data says a history item is
        almost never the answer (:func:`~forge_ray.core.gr.data.history_excluded`).
    knn_max_mb: largest item-embedding matrix (MiB) the kNN baseline loads per actor.
    """

    data: gr_data.GRDataConfig = field(default_factory=gr_data.GRDataConfig)
    split: Literal["test", "valid"] = "test"
    num_beams: int = 20
    batch_size: int = 64
    recall_ks: tuple[int, ...] = (5, 10)
    ndcg_ks: tuple[int, ...] = (5, 10)
    hr_ks: tuple[int, ...] = ()
    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    popularity: bool = True
    content_knn: bool = True
    knn_max_mb: float = 2048.0
    max_queries: int = 0
    exclude_history: Literal["auto"] | bool = "auto"

    def __post_init__(self):
        require(self.num_beams >= 1 and self.batch_size >= 1, "num_beams and batch_size must be >= 1")
        require(all(k >= 1 for k in (*self.recall_ks, *self.ndcg_ks, *self.hr_ks)), "cut-offs must be >= 1")
        require(self.actors >= 1 and self.cpus_per_actor > 0 and self.gpus_per_actor >= 0,
                "actors >= 1, cpus_per_actor > 0, gpus_per_actor >= 0")
        require(self.max_queries >= 0, "max_queries must be >= 0")

    def accumulator(self) -> RetrievalMetrics:
        return RetrievalMetrics(tuple(self.recall_ks), tuple(self.ndcg_ks), tuple(self.hr_ks))


def _state(m: RetrievalMetrics) -> str:
    return json.dumps({"sums": m.sums, "queries": m.queries, "generated": m.generated, "invalid": m.invalid})


def _from_state(text: str, cfg: EvalGRConfig) -> RetrievalMetrics:
    s = json.loads(text)
    return RetrievalMetrics(tuple(cfg.recall_ks), tuple(cfg.ndcg_ks), tuple(cfg.hr_ks),
                            s["sums"], s["queries"], s["generated"], s["invalid"])


class _Decoder:
    """Ray Data actor: the model(s) and trie are loaded once; each batch -> metric sums."""

    def __init__(self, folders: list[str], trie_ref: list, popular: np.ndarray | None, knn_ref: list | None,
                 cfg: dict):
        import faiss
        import torch

        from forge_ray.core.gr.knn import ContentKNN
        from forge_ray.core.gr.models import load_models

        self.cfg = EvalGRConfig(**{**cfg, "data": gr_data.GRDataConfig(**cfg["data"])})
        self.models, self.vocab = load_models(folders)
        device = "cuda" if self.cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.models = [m.to(device).eval() for m in self.models]
        self.trie = ray.get(trie_ref[0])
        self.popular = popular
        faiss.omp_set_num_threads(1)  # the actor's CPU share, not every core of the node
        self.knn = ContentKNN(*ray.get(knn_ref[0])) if knn_ref else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from forge_ray.core.gr.decoding import generate_sids

        prompts = [np.array(x, dtype=np.int64) for x in batch["input_ids"]]  # batches are read-only
        if "target_items" in batch:  # AL-GR test rows: several true items each
            truths = [np.asarray(t, dtype=np.int64) for t in batch["target_items"]]
        else:
            truths = [np.asarray([t]) for t in batch["target_item"].tolist()]
        histories = [np.asarray(h, dtype=np.int64) for h in batch["history_items"]] \
            if "history_items" in batch else None
        exclude = histories if self.cfg.exclude_history is True else None
        gr = self.cfg.accumulator()
        beams = generate_sids(self.models, self.vocab, self.trie, prompts, num_beams=self.cfg.num_beams)
        gr.update_from_beams(beams, self.trie, truths, exclude)
        pop = self.cfg.accumulator()
        if self.popular is not None:
            ranked = np.broadcast_to(self.popular, (len(truths), len(self.popular)))
            pop.update(ranked if exclude is None else drop_items(ranked, exclude, pop.max_k), truths)
        knn = {name: self.cfg.accumulator() for name in KNN_QUERIES}
        if self.knn is not None:
            for name, acc in knn.items():
                acc.update(self.knn.rank(histories, acc.max_k, KNN_QUERIES[name]), truths)
        # the actor's pid lets the driver report how many decoders shared the work
        return pa.table({"gr": [_state(gr)], "pop": [_state(pop)], "actor": [os.getpid()],
                         **{f"knn_{name}": [_state(acc)] for name, acc in knn.items()}})


def _training_items(batch: pa.Table, holdout: int) -> pa.Table:
    """Each sequence's training part (all but the last ``holdout`` items) as item rows."""
    seqs = batch["item_ids"].to_pylist()
    parts = [s[: max(len(s) - holdout, 0)] for s in seqs if s]
    flat = np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    return pa.table({"item_id": flat})


def _top_counts(batch: pa.Table, k: int) -> pa.Table:
    """The ``k`` highest-count rows of a batch of (item_id, count()) rows."""
    top = PopularityCounter(batch["item_id"].to_numpy(), batch["count()"].to_numpy()).top(k)
    keep = np.isin(batch["item_id"].to_numpy(), top[top >= 0])
    return batch.filter(pa.array(keep))


def popular_items(dataset: str | os.PathLike, k: int, holdout: int = 2) -> np.ndarray:
    """(k,) most interacted item ids of the training parts (all but the last ``holdout``
    items), ties by ascending id (:class:`PopularityCounter` order), -1 padded; counted
    with a distributed groupby (one partition per million interactions: a shuffle's
    partitions each cost a task however small the data), then each batch's own top
    ``k`` (every item's count lies in one batch, so their union holds the global top)."""
    interactions = int(dataset_manifest(dataset).get("counts", {}).get("interactions") or 0)
    counts = read_sequences(dataset, columns=["item_ids"]).map_batches(
        _training_items, batch_format="pyarrow", fn_kwargs={"holdout": holdout}).groupby(
        "item_id", num_partitions=partitions_for(interactions)).count()
    top = counts.map_batches(_top_counts, batch_format="pyarrow", fn_kwargs={"k": k}).take_all()
    counter = PopularityCounter(np.asarray([r["item_id"] for r in top], np.int64),
                                np.asarray([r["count()"] for r in top], np.int64))
    return counter.top(k)


def _is_encoder_decoder(model_dir: str | os.PathLike) -> bool:
    """Whether the saved model is an encoder-decoder (read from its config, no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).is_encoder_decoder


def check_vocab(model_dir: str | os.PathLike, sids: str | os.PathLike) -> SIDVocab:
    """The model's vocabulary, refused unless it matches the SID table's sizes."""
    read_manifest(model_dir, MODEL_KIND)
    vocab = SIDVocab.load(model_dir)
    sizes = gr_data.sid_sizes(sids)
    if tuple(vocab.sizes) != tuple(sizes):
        raise InputError(model_dir, f"model vocabulary has codebook sizes {list(vocab.sizes)} but the "
                                    f"SID table {os.fspath(sids)} has {list(sizes)}: train on this table")
    return vocab


def evaluate(model_dir: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
             cfg: EvalGRConfig | None = None, *, data: str | os.PathLike | None = None,
             sids: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Score the model in ``model_dir`` (or the ensemble of a list of folders, see the
    module doc) on ``data`` (default: the dataset it was trained on) with the SID table
    ``sids`` (default: its own); writes ``out/metrics.json`` + manifest, returns the
    metrics."""
    cfg = cfg or EvalGRConfig()
    dirs = model_dirs(model_dir)
    trained = read_manifest(dirs[0], MODEL_KIND)
    data, sids = (_from_manifest(dirs[0], trained, "data") if data is None else data,
                  _from_manifest(dirs[0], trained, "sids") if sids is None else sids)
    out = check_output(out, overwrite, kind=EVAL_KIND, inputs=(*dirs, data, sids))
    vocab = check_vocab(dirs[0], sids)
    holdout = trained_holdout(trained)
    for member in dirs[1:]:
        check_vocab(member, sids)
        # Here, before any actor starts, rather than only when the actors load the members.
        check_same_kind(member, dirs[0], _is_encoder_decoder(member), _is_encoder_decoder(dirs[0]))
        if trained_holdout(read_manifest(member, MODEL_KIND)) != holdout:
            raise InputError(member, f"ensemble member was trained with another data.train_holdout "
                                     f"than {dirs[0]} ({holdout}): members must see the same items")
    if cfg.split != "test" and not gr_data.is_algr(data) and holdout < 2:
        raise InputError(dirs[0], f"a refit (data.train_holdout={holdout}) was trained on the "
                                  f"{cfg.split} items: score it on split=test")
    exclude, why = _history_rule(cfg, trained, data)
    cfg = dataclasses.replace(cfg, exclude_history=exclude)
    with surface_user_errors():  # a bad row found by a Ray task reads as one line
        return _evaluate(cfg, vocab, dirs, data, sids, out, overwrite, holdout, why)


def _history_rule(cfg: EvalGRConfig, trained: dict, data) -> tuple[bool, str]:
    """(whether the rankings leave out the history items, why), for the report."""
    if gr_data.is_algr(data):
        if cfg.exclude_history is True:
            raise InputError(data, "exclude_history=true needs item histories; an AL-GR test file "
                                   "gives SID tokens only")
        return False, "AL-GR queries carry no item histories"
    if cfg.exclude_history != "auto":
        return cfg.exclude_history, "set in the config"
    counts = trained.get("counts") or {}
    decided = history_excluded(counts)
    if decided is None:
        return False, "auto: the model's manifest does not count repeated items (trained before they were)"
    return decided, (f"auto: {counts['repeats'] / counts['targets']:.2%} of the model's training targets "
                     f"repeat an item of their history (excluded below {REPEAT_RATE_MAX:.0%})")


def trained_holdout(manifest: dict) -> int:
    """``data.train_holdout`` of a model's manifest (2, the protocol, for models saved before it)."""
    return int(manifest.get("config", {}).get("data", {}).get("train_holdout", 2))


def _from_manifest(model_dir: str | os.PathLike, manifest: dict, key: str) -> str:
    """An input the model's manifest records (``read_manifest`` resolves relative paths)."""
    if not manifest.get(key):
        raise InputError(model_dir, f"the model's manifest records no {key!r}; pass --{key}")
    return manifest[key]


def _knn_table(cfg: EvalGRConfig, data) -> tuple[np.ndarray, np.ndarray] | str:
    """(item ids, embeddings) for the content-kNN baseline, or why it is skipped."""
    from forge_ray.distributed.sid_outputs import load_embeddings

    if gr_data.is_algr(data):
        return "an AL-GR test file carries no item embeddings"
    manifest = read_manifest(data, "dataset")
    dim, items = manifest.get("embedding_dim") or 0, manifest.get("counts", {}).get("items", 0)
    if not dim:
        return "the dataset has no item embeddings"
    mb = items * dim * 4 / 2**20
    if mb > cfg.knn_max_mb:
        return f"{items:,} x {dim}-d embeddings = {mb:,.0f} MiB > knn_max_mb {cfg.knn_max_mb:,.0f}"
    return load_embeddings(data)


def _evaluate(cfg: EvalGRConfig, vocab: SIDVocab, dirs: list[Path], data, sids, out: Path,
              overwrite: bool, holdout: int, history_why: str) -> dict:
    item_ids, codes = gr_data.load_sid_arrays(sids)
    trie = SIDTrie(codes, item_ids, vocab.sizes)
    algr = gr_data.is_algr(data)
    table = ItemSIDTable(item_ids, codes) if not algr and gr_data.use_broadcast(sids, cfg.data) else None
    del item_ids, codes
    add_eos = prompt_eos(_is_encoder_decoder(dirs[0]))
    if algr:  # queries and their true items come ready-made; no training part to count
        examples = gr_data.algr_test_examples(data, vocab, add_eos=add_eos).select_columns(
            ["input_ids", "target_items"])
        with gr_data.algr_read_errors(data):
            rows = examples.count()
        counts = ExampleCounts(sequences=rows, examples=rows)
    else:
        examples = gr_data.sequence_examples(
            data, sids, vocab, cfg.split, cfg.data, table=table, add_eos=add_eos
        ).select_columns(["input_ids", "target_item", "history_items"])
        counts = gr_data.count_examples(data, sids, vocab, cfg.split, cfg.data, table=table)
    if counts.examples == 0:
        raise InputError(data, f"no {cfg.split} examples (sequences: {counts.sequences}, "
                               f"too short: {counts.too_short})")
    if cfg.max_queries:
        examples = examples.limit(cfg.max_queries)
    max_k = cfg.accumulator().max_k
    # excluding a history of up to max_history items takes as many more candidates
    popular_k = max_k + (cfg.data.max_history if cfg.exclude_history else 0)
    popular = popular_items(data, popular_k, holdout) if cfg.popularity and not algr else None
    knn = _knn_table(cfg, data) if cfg.content_knn else "content_knn is off"
    knn_ref = None if isinstance(knn, str) else [ray.put(knn)]
    # Streaming re-blocking into batch-sized blocks: a small test set read from one
    # file is a single block, which would leave all actors but one idle.
    examples = examples.repartition(target_num_rows_per_block=cfg.batch_size)
    states = examples.map_batches(
        _Decoder, batch_size=cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"folders": [os.fspath(d.resolve()) for d in dirs],
                               "trie_ref": [ray.put(trie)], "popular": popular, "knn_ref": knn_ref,
                               "cfg": to_dict(cfg)},
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)
    gr, pop, actors = cfg.accumulator(), cfg.accumulator(), set()
    knn_acc = {name: cfg.accumulator() for name in KNN_QUERIES}
    for batch in states.iter_batches(batch_format="numpy", batch_size=None):
        for i, (g, p) in enumerate(zip(batch["gr"], batch["pop"])):
            gr, pop = gr.merge(_from_state(g, cfg)), pop.merge(_from_state(p, cfg))
            for name in KNN_QUERIES:
                knn_acc[name] = knn_acc[name].merge(_from_state(batch[f"knn_{name}"][i], cfg))
        actors.update(batch["actor"].tolist())
    metrics = {**gr.result(), "invalid_rate": gr.invalid / max(gr.generated, 1),
               "num_queries": gr.queries, "num_beams": cfg.num_beams, "split": cfg.split,
               "ensemble_size": len(dirs),
               "decode_actors_used": len(actors), "trained_holdout": holdout,
               "history_excluded": cfg.exclude_history, "history_excluded_why": history_why,
               "examples": asdict(counts)}
    if popular is not None:
        metrics["popularity"] = {k: v for k, v in pop.result().items() if "@" in k}
    elif cfg.popularity:
        metrics["popularity_skipped"] = "an AL-GR test file holds no training interactions to count"
    if knn_ref is not None:
        metrics["content_knn"] = {name: {k: v for k, v in acc.result().items() if "@" in k}
                                  for name, acc in knn_acc.items()}
    else:
        metrics["content_knn_skipped"] = knn
    with atomic_dir(out, overwrite, kind=EVAL_KIND, inputs=(*dirs, data, sids)) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_manifest(tmp, EVAL_KIND, model=os.path.abspath(dirs[0]),
                       ensemble=[os.path.abspath(d) for d in dirs[1:]], data=os.path.abspath(data),
                       sids=os.path.abspath(sids), config=to_dict(cfg), metrics=metrics)
    return metrics
