"""The in-process Recommender, plain HF generate with the SID constraint, cold start."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from forge_ray import Recommender, SidTable, add_items
from forge_ray.core.gr.constraint import SIDLogitsProcessor
from forge_ray.core.gr.data import pad_sequences
from forge_ray.core.gr.decoding import generate_sids
from forge_ray.core.gr.model_card import model_card
from forge_ray.errors import InputError
from forge_ray.io import read_manifest
from tests.gr_run import make_gr_run, write_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return make_gr_run(tmp_path_factory.mktemp("gr"))


def test_recommend_returns_existing_items_by_key_deterministically(run):
    rec = Recommender.from_dir(run.model)
    hist = [run.key(i) for i in run.item_ids[:4]] + ["not-an-item"]
    [r] = rec.recommend([hist], k=7)
    assert r.unknown == ["not-an-item"]
    assert len(r.items) == 7 and set(r.items) <= set(run.item_ids.tolist())  # invalid rate 0
    assert r.keys == [run.key(i) for i in r.items]
    assert r.scores == sorted(r.scores, reverse=True) and max(r.scores) <= 0
    # batched with other histories, or alone: the same answer
    other = [[run.key(i) for i in run.item_ids[10:13]], [run.key(run.item_ids[30])]]
    again = rec.recommend([other[0], hist, other[1]], k=7)[1]
    assert again.items == r.items and np.allclose(again.scores, r.scores, atol=1e-5)


def test_recommend_equals_the_eval_beam_search(run):
    rec = Recommender.from_dir(run.model)
    hist = run.item_ids[5:9]
    [(items, _)] = rec.recommend_ids([hist], k=5)
    codes, _ = rec.items.lookup(hist)
    prompt = rec.vocab.codes_to_ids(codes).reshape(-1)
    beams = generate_sids(rec.model, rec.vocab, rec.trie, [np.append(prompt, rec.vocab.eos_id)], num_beams=8)
    assert items.tolist() == rec.trie.expand(beams.codes, 5)[0].tolist()


def test_an_ensemble_of_one_model_twice_answers_as_the_model(run):
    """``from_dir([a, b])`` decodes the mixture of both models (EnsembleStep); with the
    same folder twice the mixture is the model itself."""
    one, two = Recommender.from_dir(run.model), Recommender.from_dir([run.model, run.model])
    assert len(two.models) == 2 and two.model is two.models[0]
    hist = [run.item_ids[5:9], run.item_ids[20:22]]
    for (a, sa), (b, sb) in zip(one.recommend_ids(hist, k=6), two.recommend_ids(hist, k=6)):
        assert a.tolist() == b.tolist() and np.allclose(sa, sb, atol=1e-5)


def test_history_items_left_out_when_asked(run):
    plain = Recommender.from_dir(run.model)
    assert plain.exclude_history is False  # the manifest's counts do not say whether users come back
    # an untrained model answers nearly the same whatever the history: a history of
    # its own favourites makes them come back
    hist = plain.recommend_ids([run.item_ids[5:9]], k=3)[0][0][[0, 2]]
    [(everything, _)] = plain.recommend_ids([hist], k=20)
    assert set(everything[:5].tolist()) & set(hist.tolist())
    [(items, scores)] = Recommender.from_dir(run.model, exclude_history=True).recommend_ids([hist], k=5)
    assert items.tolist() == [i for i in everything.tolist() if i not in set(hist.tolist())][:5]
    assert len(items) == 5 and scores.tolist() == sorted(scores.tolist(), reverse=True)


def test_unknown_only_history_is_a_clear_error(run):
    rec = Recommender.from_dir(run.model)
    with pytest.raises(InputError, match="history 0: no known item in the history"):
        rec.recommend([["x", "y"]])
    with pytest.raises(InputError, match="history is empty"):
        rec.recommend([[]])


@pytest.mark.parametrize("arch", ["t5", "qwen2", "gpt2"])
def test_plain_hf_generate_with_the_sid_processor_matches_constrained_search(tmp_path, arch):
    r = make_gr_run(tmp_path, arch=arch)
    rec = Recommender.from_dir(r.model)
    gen = json.loads((r.model / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == rec.vocab.n_levels and gen["num_beams"] == 8
    prompts = []
    for h in (r.item_ids[:3], r.item_ids[20:25]):
        prompts.append(np.append(rec.vocab.codes_to_ids(rec.items.lookup(h)[0]).reshape(-1), rec.vocab.eos_id))
    side = "right" if arch == "t5" else "left"
    ids, mask = pad_sequences(prompts, rec.vocab.pad_id, side=side)
    proc = SIDLogitsProcessor.for_inputs(rec.model, rec.trie, rec.vocab, ids)
    out = rec.model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]),
                             num_return_sequences=4)
    hf = rec.vocab.ids_to_codes(out[:, -rec.vocab.n_levels:].numpy()).reshape(2, 4, -1)
    ours = generate_sids(rec.model, rec.vocab, rec.trie, prompts, num_beams=8, num_return=4).codes
    assert rec.trie.contains(hf.reshape(-1, rec.vocab.n_levels)).all()  # every generated SID exists
    assert (hf[:, 0] == ours[:, 0]).all()  # the same best SID
    assert {tuple(x) for x in hf.reshape(-1, rec.vocab.n_levels).tolist()} == \
           {tuple(x) for x in ours.reshape(-1, rec.vocab.n_levels).tolist()}


def test_cold_start_items_join_without_retraining(run, tmp_path):
    rng = np.random.default_rng(1)
    new_ids = np.array([900_001, 900_002, 900_003])
    emb = run.embeddings[:3] + 0.01 * rng.normal(size=(3, run.embeddings.shape[1]))
    new = write_dataset(tmp_path / "new", new_ids, emb, ["N1", "N2", "N3"])
    m = add_items(run.sids, new, tmp_path / "sids_v2")
    assert m["version"] == 2 and m["counts"]["items"] == len(run.item_ids) + 3
    table = SidTable.open(tmp_path / "sids_v2")
    ids, codes = table.arrays()
    assert len(np.unique(ids)) == len(ids) == len(run.item_ids) + 3
    assert len(np.unique(codes, axis=0)) == len(ids)  # suffix: still one item per SID
    assert (codes < np.asarray(table.sizes)).all()  # the model's vocabulary still covers them
    assert read_manifest(run.sids)["sizes"] == list(table.sizes)
    rec = Recommender.from_dir(run.model)
    before = rec.trie.n_sids
    rec.use_sids(table)
    assert rec.trie.n_sids == before + 3
    [r] = rec.recommend([["N1", "N2"]], k=len(ids))  # new keys are known, new items recommendable
    assert r.unknown == [] and set(new_ids.tolist()) <= set(r.items)
    with pytest.raises(InputError, match="already holds new item ids"):
        add_items(tmp_path / "sids_v2", new, tmp_path / "sids_v3")
    assert not (tmp_path / "sids_v3").exists()


def test_model_card_says_how_to_use_the_model(run):
    card = model_card({**read_manifest(run.model), "steps": 5, "best": {"recall@10": 0.25}}, {},
                      read_manifest(run.sids))
    assert "Recommender.from_dir" in card and "SIDLogitsProcessor" in card and "recall@10 0.2500" in card
    assert str(list(read_manifest(run.sids)["sizes"])) in card
