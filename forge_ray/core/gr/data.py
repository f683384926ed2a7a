"""User histories -> GR training/evaluation examples -> padded tensors.

Pure functions on in-memory batches (the distributed pipeline runs them inside Ray
Data ``map_batches``). Protocol (TIGER / Amazon leave-one-out, also used for FORGE
sequences): for a user's time-ordered items s[0..n-1]

- ``test``: history s[:n-1], target s[n-1]
- ``valid``: history s[:n-2], target s[n-2]
- ``train``: sliding windows over s[:n-2]: every prefix s[:j] (j >= min_history)
  predicts s[j]. ``holdout`` (default 2) is the number of items kept out of the
  training part: 1 refits on the validation items too (the test item alone is held
  out; a final fit once every setting is chosen on validation), 3 back-tests that
  refit on the validation split (its target then lies two items past the training
  part, as the test target does without a refit)
- ``train`` as whole sequences (:func:`build_sequence_examples`, decoder-only
  models): s[:n-2] cut from its end into chunks of up to ``max_history + 1`` items
  that overlap by one item; a causal model trained on a chunk learns every item after
  its first from the items before it in one forward pass. That is the same objective
  as the chunk's sliding windows (each target, its history inside the chunk), with
  each target's history cut at the chunk start rather than at ``max_history`` items.

Prompts: an encoder-decoder reads the history then ``</s>``; a decoder-only model
reads the history alone and continues it with the next item's tokens
(:func:`prompt_eos`), so its windows are prefixes of its training sequences.

Histories keep only the most recent ``max_history`` items (20 for Amazon, 100 for
FORGE); each cut is counted. Items without a SID are dropped from the sequence
before splitting (counted as ``unknown_items``), so a target always has a SID; a
sequence too short to give an example for the split is counted in ``too_short``.

An example batch is a dict of columns:
``user_id`` (E,) int64, ``target_item`` (E,) int64,
``input_ids`` (E,) object array of 1-D int64 token ids (history SIDs, L per item,
then ``</s>``), ``labels`` (E, L) int64 token ids of the target SID, ``history_items`` (E,) object
array of the history's item ids. A sequence batch has ``input_ids`` (the chunk's
tokens) and ``labels`` (the same tokens, ``-100`` on the context item(s) that are
not targets) as equal-length object arrays, and ``target_item`` = the chunk's last item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from forge_ray.core.gr.vocab import SIDVocab

Split = Literal["train", "valid", "test"]
IGNORE = -100  # label value ignored by HF losses


@dataclass
class ExampleCounts:
    """What happened to the input; summed over batches with :meth:`merge`."""

    sequences: int = 0
    examples: int = 0
    unknown_items: int = 0
    too_short: int = 0
    truncated: int = 0
    targets: int = 0  # predicted items (sequence chunks: several each; windows: one each)
    # targets whose item already occurs earlier in the same user's sequence: with
    # ``targets`` it tells eval-gr and the Recommender whether history items can be
    # the answer (:func:`history_excluded`)
    repeats: int = 0

    def merge(self, other: "ExampleCounts") -> "ExampleCounts":
        return ExampleCounts(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


class ItemSIDTable:
    """item id -> SID codes, vectorised by binary search.

    Memory: 8 * (L + 1) bytes per item.
    """

    def __init__(self, item_ids: np.ndarray, codes: np.ndarray):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != item_ids.shape[0]:
            raise ValueError(f"item_ids {item_ids.shape} and codes {codes.shape} disagree")
        order = np.argsort(item_ids, kind="stable")
        self.item_ids, self.codes = item_ids[order], codes[order]
        if (np.diff(self.item_ids) == 0).any():
            raise ValueError("item ids are not unique")

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) item ids -> ((N, L) codes (-1 rows if unknown), (N,) bool found)."""
        items = np.asarray(items, dtype=np.int64)
        if not len(self.item_ids):
            return np.full((len(items), self.codes.shape[1]), -1, np.int64), np.zeros(len(items), bool)
        pos = np.minimum(np.searchsorted(self.item_ids, items), len(self.item_ids) - 1)
        found = self.item_ids[pos] == items
        return np.where(found[:, None], self.codes[pos], -1), found


def repeated(seq: np.ndarray) -> np.ndarray:
    """(n,) bool: item j of a sequence already occurs among items 0..j-1."""
    seq = np.asarray(seq)
    out = np.ones(len(seq), dtype=bool)
    out[np.unique(seq, return_index=True)[1]] = False
    return out


REPEAT_RATE_MAX = 0.01


def history_excluded(counts: dict | None) -> bool | None:
    """Whether rankings should skip the query's history items, from a model's
    training counts (``ExampleCounts`` as a dict, as its manifest stores them): yes
    when under ``REPEAT_RATE_MAX`` (1%) of its training targets repeated an earlier
    item of their sequence (Amazon reviews: none), so a history item is almost never
    the answer and its slot is better given to the next candidate; no when repeats
    are common (re-purchases, re-plays). None when the counts do not say (AL-GR
    files, models trained before ``repeats`` was counted)."""
    counts = counts or {}
    if not counts.get("targets") or "repeats" not in counts:
        return None
    return counts["repeats"] / counts["targets"] < REPEAT_RATE_MAX


def split_sequence(seq: np.ndarray, split: Split, min_history: int = 1, holdout: int = 2
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """One time-ordered sequence -> (histories, targets) of ``split`` (untruncated);
    ``holdout``: items at the end kept out of ``train`` (module doc)."""
    n = len(seq)
    if split == "test":
        ends = [n - 1] if n - 1 >= min_history else []
    elif split == "valid":
        ends = [n - 2] if n - 2 >= min_history else []
    elif split == "train":
        ends = list(range(min_history, n - holdout))
    else:
        raise ValueError(f"unknown split {split!r}")
    return [seq[:j] for j in ends], seq[np.asarray(ends, dtype=np.int64)]


def prompt_eos(is_encoder_decoder: bool) -> bool:
    """Whether prompts end with ``</s>``: for an encoder-decoder only (see module doc)."""
    return bool(is_encoder_decoder)


def history_input_ids(history_codes: Sequence[np.ndarray], vocab: SIDVocab, add_eos: bool = True
                      ) -> np.ndarray:
    """Per example (n_i, L) codes -> object array of (n_i * L [+ 1],) int64 token ids."""
    if not len(history_codes):
        return _object_rows([])
    lengths = np.asarray([len(h) for h in history_codes], dtype=np.int64)
    flat = vocab.codes_to_ids(np.concatenate(history_codes)).reshape(-1)
    parts = np.split(flat, np.cumsum(lengths * vocab.n_levels)[:-1])
    return _object_rows([np.append(p, vocab.eos_id) if add_eos else p for p in parts])


def build_examples(user_ids: np.ndarray, item_seqs: Sequence[np.ndarray], table: ItemSIDTable,
                   vocab: SIDVocab, split: Split, max_history: int, min_history: int = 1,
                   add_eos: bool = True, holdout: int = 2) -> tuple[dict[str, np.ndarray], ExampleCounts]:
    """A batch of user sequences -> one split's example batch (see module doc) and counts."""
    _check_lengths(max_history, min_history, holdout)
    counts = ExampleCounts(sequences=len(item_seqs))
    users, histories, targets = [], [], []
    for user, seq in zip(np.asarray(user_ids).tolist(), item_seqs):
        seq = np.asarray(seq, dtype=np.int64)
        _, found = table.lookup(seq)
        counts.unknown_items += int((~found).sum())
        hist, tgt = split_sequence(seq[found], split, min_history, holdout)
        if not hist:
            counts.too_short += 1
        else:
            counts.repeats += int(repeated(seq[found])[[len(h) for h in hist]].sum())
        for h in hist:
            counts.truncated += len(h) > max_history
            histories.append(h[-max_history:])
        targets.append(tgt)
        users.extend([user] * len(hist))
    counts.examples = counts.targets = len(users)
    targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    codes, _ = table.lookup(np.concatenate(histories) if histories else np.zeros(0, np.int64))
    history_codes = np.split(codes, np.cumsum([len(h) for h in histories])[:-1]) if histories else []
    batch = {
        "user_id": np.asarray(users, dtype=np.int64),
        "target_item": targets.astype(np.int64),
        "input_ids": history_input_ids(history_codes, vocab, add_eos),
        "labels": vocab.codes_to_ids(table.lookup(targets)[0]),
        "history_items": _object_rows(histories),
    }
    return batch, counts


def _check_lengths(max_history: int, min_history: int, holdout: int) -> None:
    if max_history < 1 or min_history < 1:
        raise ValueError(f"max_history ({max_history}) and min_history ({min_history}) must be >= 1")
    if holdout < 1:  # 0 would train on the test item
        raise ValueError(f"holdout ({holdout}) must be >= 1")


def _object_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = np.asarray(r, dtype=np.int64)
    return out


def sequence_chunks(n: int, max_history: int, min_history: int = 1) -> list[tuple[int, int, int]]:
    """A training part of ``n`` items -> [(start, end, context)] in sequence order:
    chunks s[start:end] of up to ``max_history + 1`` items cut from the end,
    overlapping by one item; the first ``context`` items of a chunk are history only
    (1, more near the start so that every target j has j >= ``min_history``), the rest
    are targets."""
    out, end = [], n
    while end > min_history:  # the chunk's last item s[end - 1] is a target
        start = max(0, end - (max_history + 1))
        out.append((start, end, max(1, min_history - start)))
        end = start + 1 if start > 0 else 0
    return out[::-1]


def build_sequence_examples(user_ids: np.ndarray, item_seqs: Sequence[np.ndarray], table: ItemSIDTable,
                            vocab: SIDVocab, max_history: int, min_history: int = 1, holdout: int = 2
                            ) -> tuple[dict[str, np.ndarray], ExampleCounts]:
    """A batch of user sequences -> whole-sequence training chunks (module doc) and counts.

    Every target of :func:`build_examples` ``"train"`` (same ``holdout``) is a target of
    exactly one chunk.
    """
    _check_lengths(max_history, min_history, holdout)
    counts = ExampleCounts(sequences=len(item_seqs))
    users, inputs, labels, last = [], [], [], []
    for user, seq in zip(np.asarray(user_ids).tolist(), item_seqs):
        seq = np.asarray(seq, dtype=np.int64)
        codes, found = table.lookup(seq)
        counts.unknown_items += int((~found).sum())
        keep = max(int(found.sum()) - holdout, 0)
        train_part = seq[found][:keep]
        chunks = sequence_chunks(len(train_part), max_history, min_history)
        if not chunks:
            counts.too_short += 1
            continue
        counts.repeats += int(repeated(train_part)[min_history:].sum())  # the chunks' targets
        ids = vocab.codes_to_ids(codes[found][:keep])
        for start, end, context in chunks:
            tokens = ids[start:end].reshape(-1)
            lab = tokens.copy()
            lab[: context * vocab.n_levels] = IGNORE
            users.append(user)
            inputs.append(tokens)
            labels.append(lab)
            last.append(train_part[end - 1])
            counts.targets += end - start - context
    counts.examples = len(users)
    return {"user_id": np.asarray(users, dtype=np.int64), "target_item": np.asarray(last, dtype=np.int64),
            "input_ids": _object_rows(inputs), "labels": _object_rows(labels)}, counts


# ---- collation ------------------------------------------------------------------
def pad_sequences(seqs: Sequence[np.ndarray], pad_value: int, side: Literal["left", "right"] = "right"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged 1-D int sequences -> ((B, T) long, (B, T) long mask of real positions)."""
    longest = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        sl = slice(longest - n, longest) if side == "left" else slice(0, n)
        ids[i, sl] = torch.from_numpy(np.array(s, dtype=np.int64))  # a copy: s may be read-only
        mask[i, sl] = 1
    return ids, mask


def collate_seq2seq(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], vocab: SIDVocab
                    ) -> dict[str, torch.Tensor]:
    """Encoder-decoder batch: ``input_ids``/``attention_mask`` (B, T), ``labels`` (B, L)
    padded with -100 (the model builds decoder inputs by shifting labels right)."""
    ids, mask = pad_sequences(input_ids, vocab.pad_id)
    lab, _ = pad_sequences(labels, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def collate_sequences(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], vocab: SIDVocab
                      ) -> dict[str, torch.Tensor]:
    """Whole-sequence decoder-only batch: ``input_ids`` / ``attention_mask`` / ``labels``
    (B, T) right-padded; labels are the chunk's own tokens with -100 on context and
    padding (HF causal LMs shift labels internally)."""
    ids, mask = pad_sequences(input_ids, vocab.pad_id)
    lab, _ = pad_sequences(labels, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def collate_causal(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], vocab: SIDVocab
                   ) -> dict[str, torch.Tensor]:
    """Decoder-only batch: prompt + target concatenated, right-padded, (B, T) each;
    ``labels`` is -100 on the prompt and padding so only the target is learned (HF
    causal LMs shift labels internally)."""
    seqs = [np.concatenate([np.asarray(p), np.asarray(t)]) for p, t in zip(input_ids, labels)]
    ids, mask = pad_sequences(seqs, vocab.pad_id)
    lab = torch.full_like(ids, IGNORE)
    for i, (p, t) in enumerate(zip(input_ids, labels)):
        lab[i, len(p): len(p) + len(t)] = torch.from_numpy(np.array(t, dtype=np.int64))
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
