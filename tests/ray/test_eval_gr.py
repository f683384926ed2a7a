"""`eval-gr`: parallel decoding actors equal a single-process evaluation; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from forge_ray.config import load_config
from forge_ray.core.gr.decoding import generate_sids
from forge_ray.core.gr.metrics import RetrievalMetrics
from forge_ray.core.gr.models import GRModelConfig, build_model, save_model
from forge_ray.core.gr.popularity import PopularityCounter
from forge_ray.core.gr.ranking import drop_items
from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.errors import InputError
from forge_ray.io import write_manifest
from tests.ray.test_train_gr import SIZES, build_gr_data

pytestmark = pytest.mark.ray


def saved_model(folder, sizes=SIZES, seed=0, arch="t5"):
    torch.manual_seed(seed)
    vocab = SIDVocab(sizes)
    model = build_model(GRModelConfig(arch, "tiny"), vocab)
    save_model(model, vocab, folder)
    write_manifest(folder, "gr_model", arch=arch, sizes=list(sizes))
    return model.eval(), vocab


def eval_config(*overrides):
    from forge_ray.distributed.evaluate import EvalGRConfig

    return load_config(EvalGRConfig, "configs/ci/eval_gr.yaml", list(overrides))


def test_parallel_eval_equals_single_process(ray_cluster, tmp_path):
    from forge_ray.distributed.evaluate import evaluate
    from forge_ray.distributed.gr_data import sequence_examples

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path)
    model, vocab = saved_model(tmp_path / "model")
    # small example batches -> several blocks, so both actors get work
    cfg = eval_config("actors=2", "batch_size=4", "data.batch_rows=8")
    got = evaluate(tmp_path / "model", tmp_path / "eval", cfg, data=ds, sids=sids)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == got
    # which actors decode is up to Ray (a fast first actor may take every block)
    assert 1 <= got["decode_actors_used"] <= 2

    # the same queries, decoded in this process in one batch
    rows = sequence_examples(ds, sids, vocab, "test", cfg.data).take_all()
    trie = SIDTrie(codes, items, SIZES)
    beams = generate_sids(model, vocab, trie, [np.asarray(r["input_ids"]) for r in rows], num_beams=8)
    ref = RetrievalMetrics((5, 10), (5, 10), (20,))
    truths = [np.asarray([r["target_item"]]) for r in rows]
    ref.update_from_beams(beams, trie, truths)
    expected = ref.result()
    assert got["num_queries"] == expected["queries"] == 40  # the empty sequence gives no query
    assert got["invalid_rate"] == 0.0 and got["generated_sids"] == expected["generated_sids"]
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "hr@20"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    assert got["examples"]["unknown_items"] == 6 and got["examples"]["too_short"] == 1

    pop = PopularityCounter()
    pop.update_from_sequences(seqs, holdout=2)
    ref_pop = RetrievalMetrics((5, 10), (5, 10), (20,))
    ref_pop.update(pop.rank(len(rows), 20), truths)
    for key, value in got["popularity"].items():
        assert value == pytest.approx(ref_pop.result()[key], rel=1e-12, abs=1e-15), key
    # this model's manifest counts no repeats: auto keeps the history items
    assert got["history_excluded"] is False and "does not count" in got["history_excluded_why"]


def test_ensemble_equals_in_process_mixture(ray_cluster, tmp_path):
    """Two model folders score as one ensemble (the mean of their next-token
    probabilities), equal to an in-process decode of the pair; members on other SIDs,
    of another kind (decoder-only beside an encoder-decoder) or trained on other items
    are refused before any decoding."""
    from forge_ray.distributed.evaluate import evaluate
    from forge_ray.distributed.gr_data import sequence_examples

    ds, sids, items, codes, *_ = build_gr_data(tmp_path)
    a, vocab = saved_model(tmp_path / "a")
    b, _ = saved_model(tmp_path / "b", seed=1)
    cfg = eval_config("batch_size=8", "popularity=false")
    got = evaluate([tmp_path / "a", tmp_path / "b"], tmp_path / "eval", cfg, data=ds, sids=sids)
    assert got["ensemble_size"] == 2

    rows = sequence_examples(ds, sids, vocab, "test", cfg.data).take_all()
    prompts = [np.asarray(r["input_ids"]) for r in rows]
    truths = [np.asarray([r["target_item"]]) for r in rows]
    trie = SIDTrie(codes, items, SIZES)
    scores = {}
    for name, models in (("pair", [a, b]), ("a", a)):
        ref = RetrievalMetrics((5, 10), (5, 10), (20,))
        ref.update_from_beams(generate_sids(models, vocab, trie, prompts, num_beams=8), trie, truths)
        scores[name] = ref.result()
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "hr@20"):
        assert got[key] == pytest.approx(scores["pair"][key], rel=1e-12, abs=1e-15), key
    assert any(scores["pair"][k] != scores["a"][k] for k in ("ndcg@10", "hr@20"))  # b counts

    saved_model(tmp_path / "other_sids", sizes=(8, 4, 4))
    with pytest.raises(InputError, match=r"other_sids: model vocabulary has codebook sizes \[8, 4, 4\]"):
        evaluate([tmp_path / "a", tmp_path / "other_sids"], tmp_path / "eval2", cfg, data=ds, sids=sids)
    saved_model(tmp_path / "causal", arch="gpt2")
    with pytest.raises(InputError, match=r"causal: ensemble mixes an encoder-decoder and a decoder-only model"):
        evaluate([tmp_path / "a", tmp_path / "causal"], tmp_path / "eval2", cfg, data=ds, sids=sids)
    write_manifest(tmp_path / "b", "gr_model", arch="t5", sizes=list(SIZES), config={"data": {"train_holdout": 1}})
    with pytest.raises(InputError, match=r"b: ensemble member was trained with another data.train_holdout"):
        evaluate([tmp_path / "a", tmp_path / "b"], tmp_path / "eval2", cfg, data=ds, sids=sids)
    assert not (tmp_path / "eval2").exists()


def test_vocabulary_mismatch_is_refused(ray_cluster, tmp_path):
    from forge_ray.distributed.evaluate import evaluate

    ds, sids, *_ = build_gr_data(tmp_path, n_users=4)
    saved_model(tmp_path / "model", sizes=(8, 4, 4))
    with pytest.raises(InputError, match=r"codebook sizes \[8, 4, 4\].*\[4, 4, 4\]"):
        evaluate(tmp_path / "model", tmp_path / "eval", eval_config(), data=ds, sids=sids)
    assert not (tmp_path / "eval").exists()


def test_algr_test_file_scores_like_the_dataset(ray_cluster, tmp_path):
    """The same queries written as an AL-GR test file (answers: item ids) give the same
    metrics; a query may list several true items."""
    from forge_ray.core.gr.algr import write_algr
    from forge_ray.distributed.evaluate import evaluate
    from forge_ray.distributed.gr_data import sequence_examples

    ds, sids, *_ = build_gr_data(tmp_path)
    _, vocab = saved_model(tmp_path / "model")
    cfg = eval_config("batch_size=8")
    want = evaluate(tmp_path / "model", tmp_path / "eval_ds", cfg, data=ds, sids=sids)

    rows = sequence_examples(ds, sids, vocab, "test", cfg.data).take_all()
    batch = {"input_ids": [np.asarray(r["input_ids"]) for r in rows],
             "target_items": [np.asarray([r["target_item"]]) for r in rows]}
    test_file = tmp_path / "test.tsv"
    assert write_algr(test_file, [batch], vocab) == 40
    got = evaluate(tmp_path / "model", tmp_path / "eval_algr", cfg, data=test_file, sids=sids)
    assert got["num_queries"] == 40 and got["invalid_rate"] == 0.0
    assert "popularity" not in got and "training interactions" in got["popularity_skipped"]
    assert "content_knn" not in got and "no item embeddings" in got["content_knn_skipped"]
    assert got["history_excluded"] is False and "AL-GR" in got["history_excluded_why"]
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "hr@20"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key

    # a second true item that is never generated halves HR (|top-K ∩ true| / |true|)
    batch["target_items"] = [np.asarray([t[0], -5]) for t in batch["target_items"]]
    write_algr(test_file, [batch], vocab)
    two = evaluate(tmp_path / "model", tmp_path / "eval_two", cfg, data=test_file, sids=sids)
    assert two["hr@20"] == pytest.approx(want["hr@20"] / 2, rel=1e-12, abs=1e-15)

    with pytest.raises(InputError, match=r"test.tsv: exclude_history=true needs item histories"):
        evaluate(tmp_path / "model", tmp_path / "eval_excl", eval_config("exclude_history=true"),
                 data=test_file, sids=sids)

    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tsystem\tuser\tanswer\nq1\tsys\thist:C1C5C9\t\n")
    with pytest.raises(InputError, match=r"bad.tsv: row q1: answer holds no item ids"):
        evaluate(tmp_path / "model", tmp_path / "eval_bad", cfg, data=bad, sids=sids)
    assert not (tmp_path / "eval_bad").exists()


def test_content_knn_baselines_on_the_same_queries(ray_cluster, tmp_path):
    """With item embeddings in the dataset, eval-gr scores cosine kNN of the last
    history item and of the history mean on the same queries, equal to an in-process
    ranking; --model alone finds the data and SID table through the model's manifest."""
    from forge_ray.core.gr.knn import ContentKNN
    from forge_ray.data.schema import ShardWriter, embedding_array, items_schema
    from forge_ray.distributed.evaluate import _knn_table, evaluate
    from forge_ray.distributed.gr_data import sequence_examples

    ds, sids, items, codes, users, seqs = build_gr_data(tmp_path)
    emb = np.random.default_rng(3).normal(size=(len(items), 6)).astype(np.float32)
    with ShardWriter(ds / "items", items_schema(6), rows_per_shard=20) as w:
        w.write(pa.table({"item_id": items, "embedding": embedding_array(emb)}, schema=items_schema(6)))
    write_manifest(ds, "dataset", counts={"sequences": len(users), "items": len(items)}, embedding_dim=6)
    model, vocab = saved_model(tmp_path / "model")
    write_manifest(tmp_path / "model", "gr_model", arch="t5", sizes=list(SIZES), data=str(ds), sids=str(sids))
    # history items forced out of the GR and most-popular rankings too (kNN always)
    cfg = eval_config("batch_size=8", "exclude_history=true")
    got = evaluate(tmp_path / "model", tmp_path / "eval", cfg)  # data and SIDs from the manifest
    assert got["history_excluded"] is True and got["history_excluded_why"] == "set in the config"

    rows = sequence_examples(ds, sids, vocab, "test", cfg.data).take_all()
    truths = [np.asarray([r["target_item"]]) for r in rows]
    histories = [np.asarray(r["history_items"]) for r in rows]
    knn = ContentKNN(items, emb)
    for name, query in (("last_item", "last"), ("history_mean", "mean")):
        ref = RetrievalMetrics((5, 10), (5, 10), (20,))
        ref.update(knn.rank(histories, 20, query), truths)
        for key, value in got["content_knn"][name].items():
            assert value == pytest.approx(ref.result()[key], rel=1e-12, abs=1e-15), (name, key)
    assert got["content_knn"]["last_item"] != got["content_knn"]["history_mean"]
    assert got["num_queries"] == 40 and "content_knn_skipped" not in got

    trie = SIDTrie(codes, items, SIZES)
    beams = generate_sids(model, vocab, trie, [np.asarray(r["input_ids"]) for r in rows], num_beams=8)
    pop = PopularityCounter()
    pop.update_from_sequences(seqs, holdout=2)
    ref, ref_pop, kept = (RetrievalMetrics((5, 10), (5, 10), (20,)) for _ in range(3))
    ref.update_from_beams(beams, trie, truths, exclude=histories)
    kept.update_from_beams(beams, trie, truths)
    ref_pop.update(drop_items(pop.rank(len(rows), 20 + cfg.data.max_history), histories, 20), truths)
    assert ref.result() != kept.result()  # this untrained model ranks history items
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "hr@20"):
        assert got[key] == pytest.approx(ref.result()[key], rel=1e-12, abs=1e-15), key
        assert got["popularity"][key] == pytest.approx(ref_pop.result()[key], rel=1e-12, abs=1e-15), key

    # too big for knn_max_mb: skipped, and the reason goes into the report
    assert "knn_max_mb" in _knn_table(eval_config("knn_max_mb=0.0001"), ds)
