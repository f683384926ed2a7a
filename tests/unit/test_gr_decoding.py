"""Constrained beam search: exact against brute force with a scripted model, and
only valid SIDs from real (random-init) tiny T5 / Qwen2 models."""

import numpy as np
import pytest
import torch

from forge_ray.core.gr.decoding import (CausalStep, EnsembleStep, Seq2SeqStep, constrained_beam_search,
                                        generate_sids, hf_generate_unconstrained)
from forge_ray.core.gr.metrics import invalid_counts
from forge_ray.core.gr.models import GRModelConfig, build_model
from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import SIDVocab

SIZES = (4, 3, 5)


class ScriptedModel:
    """Next-token log-probs drawn from a fixed random table keyed by (query, prefix).

    Tracks which query each row belongs to through ``parent``, as a KV cache would.
    """

    def __init__(self, vocab_size, seed=0):
        self.seed, self.v = seed, vocab_size
        self.query = None

    def logp(self, query, prefix):
        rng = np.random.default_rng([self.seed, query, *prefix])
        x = rng.normal(size=self.v) * 3
        return x - np.log(np.exp(x).sum())

    def __call__(self, prefix, parent):
        self.query = parent.numpy() if self.query is None else self.query[parent.numpy()]
        rows = [self.logp(q, p) for q, p in zip(self.query.tolist(), prefix.tolist())]
        return torch.tensor(np.array(rows), dtype=torch.float32)


def brute_force(model, query, trie, vocab):
    """All valid SIDs of one query ranked by summed log-prob."""
    from forge_ray.core.sid.codes import unpack_codes

    out = []
    for code in unpack_codes(trie.sid_keys, trie.sizes):
        ids = vocab.codes_to_ids(code).tolist()
        out.append((sum(model.logp(query, ids[:t])[ids[t]] for t in range(3)), tuple(code)))
    return sorted(out, reverse=True)


@pytest.fixture
def toy():
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, s, 25) for s in SIZES], axis=1)
    return SIDTrie(codes, np.arange(25), SIZES), SIDVocab(SIZES)


@pytest.mark.parametrize("num_beams", [60, 7])
def test_beam_search_matches_brute_force(toy, num_beams):
    trie, vocab = toy
    n_q = 4
    model = ScriptedModel(len(vocab))
    res = constrained_beam_search(model, n_q, trie, vocab, num_beams=num_beams, num_return=min(num_beams, 30))
    assert trie.contains(res.codes[res.found]).all()
    for q in range(n_q):
        truth = brute_force(ScriptedModel(len(vocab)), q, trie, vocab)
        got = [(s, tuple(c)) for s, c in zip(res.scores[q].tolist(), res.codes[q].tolist()) if np.isfinite(s)]
        # scores are the true summed log-probs of the returned SIDs, in descending order
        exact = dict((c, s) for s, c in truth)
        for s, c in got:
            assert s == pytest.approx(exact[c], abs=1e-4)
        assert [s for s, _ in got] == sorted([s for s, _ in got], reverse=True)
        if num_beams >= trie.n_sids:  # exhaustive: exactly the brute-force ranking
            assert [c for _, c in got] == [c for _, c in truth][: len(got)]
            assert len(got) == min(30, trie.n_sids)
        else:  # pruned search: distinct valid SIDs, each ranked consistently with brute force
            assert len(set(c for _, c in got)) == len(got) == 7
            order = [c for _, c in truth]
            assert sorted(order.index(c) for _, c in got) == [order.index(c) for _, c in got]


def test_beam_search_pads_when_fewer_sids_than_beams():
    vocab = SIDVocab(SIZES)
    trie = SIDTrie(np.array([[0, 1, 2], [3, 2, 4], [3, 2, 0]]), np.array([5, 6, 7]), SIZES)
    res = constrained_beam_search(ScriptedModel(len(vocab)), 2, trie, vocab, num_beams=10, num_return=5)
    assert res.codes.shape == (2, 5, 3)
    assert res.found.sum(axis=1).tolist() == [3, 3]
    assert (res.codes[:, 3:] == -1).all() and np.isneginf(res.scores[:, 3:]).all()
    assert {tuple(c) for c in res.codes[0, :3].tolist()} == {(0, 1, 2), (3, 2, 4), (3, 2, 0)}


def _prompts(vocab, n, rng):
    return [np.append(vocab.codes_to_ids(np.stack([rng.integers(0, s, k) for s in vocab.sizes], 1)).reshape(-1),
                      vocab.eos_id) for k in rng.integers(1, 6, n)]


@pytest.mark.parametrize("arch", ["t5", "qwen2", "gpt2"])
def test_real_tiny_models_give_only_valid_sids(toy, arch):
    trie, vocab = toy
    torch.manual_seed(0)
    model = build_model(GRModelConfig(arch=arch, preset="tiny"), vocab).eval()
    prompts = _prompts(vocab, 6, np.random.default_rng(2))
    res = generate_sids(model, vocab, trie, prompts, num_beams=8, num_return=8)
    assert res.found.all()
    assert invalid_counts(res, trie) == (48, 0)
    assert all(len({tuple(c) for c in q}) == 8 for q in res.codes.tolist())
    # the unconstrained reference decoder runs with the same beams and is scored the same way
    free = hf_generate_unconstrained(model, vocab, prompts, num_beams=8, num_return=8)
    generated, invalid = invalid_counts(free, trie)
    assert generated == 48 and 0 <= invalid <= 48


@pytest.mark.parametrize("arch", ["t5", "qwen2", "gpt2"])
def test_cached_step_equals_full_forward(arch):
    """The KV-cached step functions give the log-probs of a full forward pass, also after
    beams are reordered/expanded (parent indices) and with left padding (decoder-only)."""
    vocab = SIDVocab(SIZES)
    torch.manual_seed(0)
    model = build_model(GRModelConfig(arch=arch, preset="tiny"), vocab).eval()
    from forge_ray.core.gr.data import pad_sequences
    prompts = _prompts(vocab, 3, np.random.default_rng(3))
    side = "right" if arch == "t5" else "left"
    ids, mask = pad_sequences(prompts, vocab.pad_id, side=side)
    step = Seq2SeqStep(model, ids, mask, vocab.bos_id) if arch == "t5" else CausalStep(model, ids, mask)
    parent0 = torch.arange(3)
    step(torch.zeros((3, 0), dtype=torch.long), parent0)
    parent1 = torch.tensor([2, 0, 0, 1])  # expand to 4 rows in a new order
    prefix = torch.tensor([[5], [6], [7], [8]])
    got = step(prefix, parent1)
    parent2 = torch.tensor([3, 1])
    prefix2 = torch.tensor([[8, 10], [6, 11]])
    got2 = step(prefix2, parent2)
    with torch.no_grad():
        for rows, pre, out, query in ((4, prefix, got, parent1), (2, prefix2, got2, parent1[parent2])):
            for r in range(rows):
                p = torch.as_tensor(prompts[int(query[r])])[None]
                if arch == "t5":
                    dec = torch.cat([torch.tensor([[vocab.bos_id]]), pre[r:r + 1]], 1)
                    logits = model(input_ids=p, decoder_input_ids=dec).logits[0, -1]
                else:
                    logits = model(input_ids=torch.cat([p, pre[r:r + 1]], 1)).logits[0, -1]
                torch.testing.assert_close(out[r], torch.log_softmax(logits, -1), atol=1e-4, rtol=1e-4)


def test_ensemble_step_is_the_mixture_of_its_members(toy):
    """EnsembleStep = log of the mean of the members' probabilities, each member keeping
    its own per-row state; beam search over it ranks SIDs by that mixture exactly."""
    trie, vocab = toy
    from forge_ray.core.sid.codes import unpack_codes

    members = [ScriptedModel(len(vocab), seed=0), ScriptedModel(len(vocab), seed=1)]
    n = min(20, trie.n_sids)
    res = constrained_beam_search(EnsembleStep(members), 3, trie, vocab, num_beams=60, num_return=n)
    alone = [ScriptedModel(len(vocab), seed=0), ScriptedModel(len(vocab), seed=1)]
    for q in range(3):
        def mixture_score(code):
            ids = vocab.codes_to_ids(np.asarray(code)).tolist()
            return sum(np.logaddexp(*(m.logp(q, ids[:t])[ids[t]] for m in alone)) - np.log(2)
                       for t in range(3))
        got = [tuple(c) for c in res.codes[q].tolist()]
        sids = [tuple(c) for c in unpack_codes(trie.sid_keys, trie.sizes).tolist()]
        assert got == sorted(sids, key=mixture_score, reverse=True)[:n]
        assert res.scores[q].tolist() == pytest.approx([mixture_score(c) for c in got], abs=1e-4)


@pytest.mark.parametrize("arch", ["t5", "qwen2"])
def test_ensemble_of_real_models(toy, arch):
    """A model ensembled with itself decodes as the model alone; two different models
    give valid SIDs; kinds cannot be mixed."""
    trie, vocab = toy
    torch.manual_seed(0)
    a, b = (build_model(GRModelConfig(arch=arch, preset="tiny"), vocab).eval() for _ in range(2))
    prompts = _prompts(vocab, 5, np.random.default_rng(4))
    one = generate_sids(a, vocab, trie, prompts, num_beams=6)
    same = generate_sids([a, a], vocab, trie, prompts, num_beams=6)
    np.testing.assert_array_equal(same.codes, one.codes)
    np.testing.assert_allclose(same.scores, one.scores, atol=1e-5)
    mixed = generate_sids([a, b], vocab, trie, prompts, num_beams=6)
    assert mixed.found.all() and invalid_counts(mixed, trie) == (30, 0)
    other = build_model(GRModelConfig(arch="gpt2" if arch == "t5" else "t5", preset="tiny"), vocab)
    with pytest.raises(ValueError, match="mixes encoder-decoder and decoder-only"):
        generate_sids([a, other], vocab, trie, prompts, num_beams=6)
