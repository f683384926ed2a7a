"""History -> example building (leave-one-out, truncation, sliding windows) and collation."""

import numpy as np
import pytest
import torch

from forge_ray.core.gr.data import (IGNORE, ExampleCounts, ItemSIDTable, build_examples,
                                    collate_causal, collate_seq2seq)
from forge_ray.core.gr.vocab import SIDVocab

VOCAB = SIDVocab((10, 10, 10))
# item i has SID (i % 10, (i // 10) % 10, 7); item 99 has none
TABLE = ItemSIDTable(np.arange(1, 60), np.stack([np.arange(1, 60) % 10, (np.arange(1, 60) // 10) % 10,
                                                 np.full(59, 7)], 1))
USERS = np.array([100, 101, 102])
SEQS = [np.array([1, 2, 3, 4, 5, 6]), np.array([11, 99, 12]), np.array([21, 22, 23, 24])]


def ids(*items):
    return VOCAB.codes_to_ids(TABLE.lookup(np.array(items))[0]).reshape(-1)


def test_leave_one_out_test_and_valid_with_truncation():
    test, c = build_examples(USERS, SEQS, TABLE, VOCAB, "test", max_history=3)
    assert test["user_id"].tolist() == [100, 101, 102]
    assert test["target_item"].tolist() == [6, 12, 24]
    np.testing.assert_array_equal(test["input_ids"][0], np.append(ids(3, 4, 5), VOCAB.eos_id))
    np.testing.assert_array_equal(test["input_ids"][1], np.append(ids(11), VOCAB.eos_id))
    np.testing.assert_array_equal(test["labels"][2], ids(24))
    assert c == ExampleCounts(sequences=3, examples=3, unknown_items=1, too_short=0, truncated=1, targets=3)
    valid, c = build_examples(USERS, SEQS, TABLE, VOCAB, "valid", max_history=3)
    # user 101 is [11, 12] once 99 (no SID) is dropped: too short for a validation example
    assert valid["target_item"].tolist() == [5, 23]
    assert c.truncated == 1 and c.too_short == 1


def test_sliding_window_training_examples():
    train, c = build_examples(USERS, SEQS, TABLE, VOCAB, "train", max_history=2, add_eos=False)
    # user 100 train part [1,2,3,4]: 1->2, 12->3, 23->4 (history cut to 2); user 101: none;
    # user 102 train part [21,22]: 21->22
    assert train["user_id"].tolist() == [100, 100, 100, 102]
    assert train["target_item"].tolist() == [2, 3, 4, 22]
    np.testing.assert_array_equal(train["input_ids"][2], ids(2, 3))
    assert c == ExampleCounts(sequences=3, examples=4, unknown_items=1, too_short=1, truncated=1, targets=4)
    merged = c.merge(c)
    assert merged.examples == 8 and merged.unknown_items == 2


def test_collate_seq2seq_and_causal():
    inputs = [np.array([5, 6, 7, 1]), np.array([8, 1])]
    labels = [np.array([9, 20, 30]), np.array([10, 21, 31])]
    b = collate_seq2seq(inputs, labels, VOCAB)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[9, 20, 30], [10, 21, 31]]
    c = collate_causal(inputs, labels, VOCAB)
    assert c["input_ids"].tolist() == [[5, 6, 7, 1, 9, 20, 30], [8, 1, 10, 21, 31, 0, 0]]
    assert c["labels"].tolist() == [[IGNORE] * 4 + [9, 20, 30], [IGNORE] * 2 + [10, 21, 31, IGNORE, IGNORE]]
    assert c["attention_mask"].sum(1).tolist() == [7, 5]
    assert c["input_ids"].dtype == torch.long


def test_empty_batch():
    b, c = build_examples(np.zeros(0, np.int64), [], TABLE, VOCAB, "train", max_history=5)
    assert len(b["input_ids"]) == 0 and b["labels"].shape == (0, 3) and c.examples == 0


def test_sequence_chunks_hold_every_window_target_once():
    from forge_ray.core.gr.data import sequence_chunks

    for n in range(0, 30):
        for max_history in (1, 2, 5, 20):
            for min_history in range(1, max_history + 1):
                targets = []
                for start, end, context in sequence_chunks(n, max_history, min_history):
                    assert end - start <= max_history + 1 and context >= 1
                    targets += list(range(start + context, end))
                # windows: every prefix s[:j], j >= min_history, of the n items
                assert targets == list(range(min_history, n)), (n, max_history, min_history)


def test_sequence_examples_and_collation():
    from forge_ray.core.gr.data import build_sequence_examples, collate_sequences

    seqs = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([11, 99, 12]), np.array([21, 22, 23, 24])]
    ex, c = build_sequence_examples(USERS, seqs, TABLE, VOCAB, max_history=2)
    # user 100 train part [1..5]: chunks [3,4,5] (targets 4, 5) and [1,2,3] (targets 2, 3)
    assert ex["user_id"].tolist() == [100, 100, 102] and ex["target_item"].tolist() == [3, 5, 22]
    np.testing.assert_array_equal(ex["input_ids"][1], ids(3, 4, 5))
    np.testing.assert_array_equal(ex["labels"][1], np.r_[[IGNORE] * 3, ids(4, 5)])
    windows, wc = build_examples(USERS, seqs, TABLE, VOCAB, "train", max_history=2)
    assert c.targets == wc.examples == 5  # the same targets: 2, 3, 4, 5 and 22
    assert c == ExampleCounts(sequences=3, examples=3, unknown_items=1, too_short=1, targets=5)
    b = collate_sequences(list(ex["input_ids"]), list(ex["labels"]), VOCAB)
    assert b["input_ids"].shape == (3, 9) and b["attention_mask"].sum(1).tolist() == [9, 9, 6]
    assert (b["labels"][2, :3] == IGNORE).all() and (b["labels"][2, 6:] == IGNORE).all()
    assert b["labels"][2, 3:6].tolist() == ids(22).tolist()


def test_full_sequence_loss_is_the_mean_of_the_window_losses():
    """For a decoder-only model the whole-sequence objective is the windows' objective:
    one forward pass over a user's items gives the mean of the per-window losses."""
    from forge_ray.core.gr.data import build_sequence_examples, collate_sequences, prompt_eos
    from forge_ray.core.gr.models import GRModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(GRModelConfig("qwen2", "tiny"), VOCAB).eval()
    seq = [np.array([1, 2, 3, 4, 5, 6, 7, 8])]
    full, _ = build_sequence_examples(USERS[:1], seq, TABLE, VOCAB, max_history=20)
    assert len(full["input_ids"]) == 1  # one chunk: every target 2..6 of the train part
    windows, _ = build_examples(USERS[:1], seq, TABLE, VOCAB, "train", max_history=20,
                                add_eos=prompt_eos(False))
    with torch.no_grad():
        one = model(**collate_sequences(list(full["input_ids"]), list(full["labels"]), VOCAB)).loss
        per_window = [model(**collate_causal([p], [t], VOCAB)).loss
                      for p, t in zip(windows["input_ids"], windows["labels"])]
    assert len(per_window) == 5
    assert float(one) == pytest.approx(float(torch.stack(per_window).mean()), rel=1e-5)


def test_train_holdout_moves_the_end_of_the_training_part():
    """holdout 2 keeps the validation and test items out of training; 1 (a refit) trains
    on the validation item, never the test item; 3 leaves the validation target two items
    past the training part, as test is without a refit; 0 is refused."""
    from forge_ray.core.gr.data import build_sequence_examples

    seq = [np.array([1, 2, 3, 4, 5, 6, 7])]
    targets = {}
    for holdout in (1, 2, 3):
        windows, _ = build_examples(USERS[:1], seq, TABLE, VOCAB, "train", max_history=20, holdout=holdout)
        chunks, c = build_sequence_examples(USERS[:1], seq, TABLE, VOCAB, max_history=20, holdout=holdout)
        targets[holdout] = windows["target_item"].tolist()
        assert c.targets == len(targets[holdout]) and chunks["target_item"].tolist() == [targets[holdout][-1]]
    assert targets == {1: [2, 3, 4, 5, 6], 2: [2, 3, 4, 5], 3: [2, 3, 4]}
    valid, _ = build_examples(USERS[:1], seq, TABLE, VOCAB, "valid", max_history=20, holdout=1)
    assert valid["target_item"].tolist() == [6]  # the evaluation splits do not move
    for build in (lambda: build_examples(USERS[:1], seq, TABLE, VOCAB, "train", 20, holdout=0),
                  lambda: build_sequence_examples(USERS[:1], seq, TABLE, VOCAB, 20, holdout=0)):
        with pytest.raises(ValueError, match="holdout"):
            build()


def test_repeated_targets_are_counted_the_same_by_windows_and_chunks():
    from forge_ray.core.gr.data import build_sequence_examples, repeated

    np.testing.assert_array_equal(repeated(np.array([4, 5, 4, 4, 6, 5])), [0, 0, 1, 1, 0, 1])
    # user 100 comes back to 2 (twice) and 3 in its training part; user 101's return to
    # 11 is its validation item, held out with the test item, so not counted
    seqs = [np.array([1, 2, 3, 2, 3, 2, 8, 9]), np.array([11, 12, 11, 13]), np.array([21, 21])]
    for min_history, targets in ((1, [2, 3, 2, 3, 2, 12]), (2, [3, 2, 3, 2])):
        windows, wc = build_examples(USERS, seqs, TABLE, VOCAB, "train", max_history=2, min_history=min_history)
        _, cc = build_sequence_examples(USERS, seqs, TABLE, VOCAB, max_history=2, min_history=min_history)
        assert windows["target_item"].tolist() == targets
        assert wc.repeats == cc.repeats == 3 and wc.targets == cc.targets == len(targets)
