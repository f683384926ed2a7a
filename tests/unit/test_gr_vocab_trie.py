"""SID vocabulary round trips and the vectorised trie against brute force."""

import itertools

import numpy as np
import pytest

from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import N_SPECIAL, SIDVocab
from forge_ray.core.sid.codes import sid_string
from forge_ray.errors import InputError


def test_vocab_ids_follow_forge_token_numbering():
    v = SIDVocab((8192, 8192, 8192))
    assert len(v) == N_SPECIAL + 3 * 8192
    ids = v.codes_to_ids(np.array([[1442, 14117 - 8192, 19114 - 16384]]))
    assert v.ids_to_text(ids[0]) == "C1442C14117C19114"
    assert v.ids_to_text(ids[0]) == sid_string([1442, 14117 - 8192, 19114 - 16384], v.sizes)
    np.testing.assert_array_equal(v.tokens_to_ids("C1442C14117C19114"), ids[0])
    assert v.level_range(1) == (N_SPECIAL + 8192, N_SPECIAL + 16384)


def test_vocab_code_round_trip_and_off_level_ids():
    v = SIDVocab((4, 3, 5, 2))  # 4 levels: last one a de-dup suffix
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, s, 50) for s in v.sizes], axis=1)
    np.testing.assert_array_equal(v.ids_to_codes(v.codes_to_ids(codes)), codes)
    # level-0 token in the level-1 slot, and a special, decode to -1
    bad = v.ids_to_codes(np.array([[N_SPECIAL, N_SPECIAL, v.pad_id, N_SPECIAL + 11]]))
    np.testing.assert_array_equal(bad, [[0, -1, -1, -1]])
    with pytest.raises(ValueError):
        v.codes_to_ids(np.array([[4, 0, 0, 0]]))


def test_vocab_save_load_and_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    v = SIDVocab((6, 5, 7))
    v.save(tmp_path)
    assert SIDVocab.load(tmp_path) == v
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(v)
    text = "C3C8C12</s>"
    assert tok(text, add_special_tokens=False)["input_ids"] == [8, 13, 17, v.eos_id]
    assert tok.pad_token_id == v.pad_id and tok.eos_token_id == v.eos_id
    assert tok.convert_ids_to_tokens([8, 13]) == ["C3", "C8"]
    with pytest.raises(InputError, match="sid_vocab.json"):
        SIDVocab.load(tmp_path / "nothing")


def _toy_trie(n=40, sizes=(4, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1)
    items = rng.permutation(1000)[:n] + 10_000
    return SIDTrie(codes, items, sizes), codes, items


def test_trie_masks_equal_brute_force_prefix_check():
    trie, codes, _ = _toy_trie()
    real = {tuple(c) for c in codes.tolist()}
    for depth in range(3):
        prefixes = list(itertools.product(*[range(s) for s in trie.sizes[:depth]]))
        keys = np.array([0 if depth == 0 else np.ravel_multi_index(p, trie.sizes[:depth])
                         for p in prefixes], dtype=np.int64)
        mask = trie.allowed(keys, depth)
        for p, row in zip(prefixes, mask):
            expect = [any(r[: depth + 1] == p + (c,) for r in real) for c in range(trie.sizes[depth])]
            assert row.tolist() == expect
    assert not trie.allowed(np.array([-1]), 1).any()  # dead beam has no children


def test_trie_items_expand_in_beam_order():
    codes = np.array([[0, 0, 0], [0, 0, 0], [1, 2, 3], [0, 0, 0], [1, 2, 4]])
    items = np.array([50, 7, 9, 30, 11])
    trie = SIDTrie(codes, items, (2, 3, 5))
    assert trie.n_sids == 3
    assert [a.tolist() for a in trie.items_of(np.array([[0, 0, 0], [1, 2, 4], [1, 1, 1]]))] == [[7, 30, 50], [11], []]
    np.testing.assert_array_equal(trie.contains(np.array([[1, 2, 3], [1, 2, 2], [-1, 0, 0]])), [True, False, False])
    beams = np.array([[[1, 2, 4], [0, 0, 0], [1, 2, 3]],
                      [[-1, -1, -1], [1, 1, 1], [1, 2, 3]]])
    np.testing.assert_array_equal(trie.expand(beams, 4), [[11, 7, 30, 50], [9, -1, -1, -1]])
