"""Recommendations from a trained GR model, in this process (CPU or GPU).

    from forge_ray import Recommender
    rec = Recommender.from_dir("run/train_gr")          # SID table found via the manifest
    [r] = rec.recommend([["B004756YJA", "B0009RF9DW"]], k=10)
    r.keys, r.items, r.scores                            # best first

Everything is loaded once: the model and its vocabulary (``GR_DIR``), the SID table
that the model's manifest names (or ``sids=``), the trie over it, and the table of
the sources' own item keys (ASINs, FORGE ids; the item id as text when a dataset has
none). A history is a list of item keys, oldest first; items the table does not know
are skipped and reported in :attr:`Recommendation.unknown`, and a history with no
known item is an :class:`~forge_ray.errors.InputError`.

Several model folders (the same config trained with other seeds on one SID table)
answer as one ensemble: ``Recommender.from_dir([dir_a, dir_b])`` decodes the mean of
their next-token probabilities (eval-gr's ``--model A B``), at n times the cost.

Scores are the log-probability of the item's SID (items sharing a SID share it);
decoding is the trie-constrained beam search of eval-gr, so every recommended item
exists. Items of the history itself are left out when the model's training data says
users do not come back to an item (``exclude_history``, eval-gr's rule:
:func:`~forge_ray.core.gr.data.history_excluded`). Memory: the model, 8 x (L + 2)
bytes per item for trie and table, plus the key strings.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from forge_ray.core.gr.data import ItemSIDTable, history_excluded, history_input_ids, prompt_eos
from forge_ray.core.gr.decoding import generate_sids
from forge_ray.core.gr.models import MODEL_KIND, load_models, model_dirs
from forge_ray.core.gr.ranking import beam_items
from forge_ray.core.gr.trie import SIDTrie
from forge_ray.errors import InputError
from forge_ray.io import read_manifest
from forge_ray.sid_table import SidTable


@dataclass
class Recommendation:
    """One history's answer, best first.

    items: item ids; keys: the same items as the source's keys; scores: SID
    log-probs (float, <= 0); unknown: history entries that were skipped.
    """

    items: list[int]
    keys: list[str]
    scores: list[float]
    unknown: list[str]

    def to_dict(self) -> dict:
        """The JSON answer of the CLI and of Serve (scores rounded to 6 decimals)."""
        return {**asdict(self), "scores": [round(s, 6) for s in self.scores]}


class ItemKeys:
    """item id <-> the source's key string, both ways by binary search."""

    def __init__(self, item_ids: np.ndarray, keys: np.ndarray):
        order = np.argsort(item_ids, kind="stable")
        self.ids, self.keys_by_id = item_ids[order], keys[order]
        by_key = np.argsort(keys, kind="stable")
        self.sorted_keys, self.ids_by_key = keys[by_key], item_ids[by_key]

    def to_ids(self, keys: Sequence[str]) -> np.ndarray:
        """(n,) keys -> (n,) item ids, -1 where unknown."""
        q = np.asarray([str(k) for k in keys], dtype=object)
        if not len(self.sorted_keys) or not len(q):
            return np.full(len(q), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_keys, q), len(self.sorted_keys) - 1)
        return np.where(self.sorted_keys[pos] == q, self.ids_by_key[pos], -1).astype(np.int64)

    def to_keys(self, ids: np.ndarray) -> list[str]:
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        return [str(self.keys_by_id[p]) if len(self.ids) and self.ids[p] == i else str(i)
                for p, i in zip(pos.tolist(), np.asarray(ids).tolist())]


class Recommender:
    """A GR model (or an ensemble) plus its SID table, ready to answer histories (see
    module doc). ``model``: one HF model or a list of them over ``vocab``; ``self.model``
    is the first, ``self.models`` all of them."""

    def __init__(self, model, vocab, table: SidTable, max_history: int, num_beams: int = 20,
                 batch_size: int = 64, exclude_history: bool = False):
        self.models = [m.eval() for m in (model if isinstance(model, (list, tuple)) else [model])]
        self.model, self.vocab = self.models[0], vocab
        self.max_history, self.num_beams, self.batch_size = max_history, num_beams, batch_size
        self.exclude_history = exclude_history
        self.use_sids(table)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike | Sequence[str | os.PathLike],
                 sids: str | os.PathLike | None = None,
                 device: str | None = None, num_beams: int | None = None,
                 batch_size: int = 64, exclude_history: bool | None = None) -> "Recommender":
        """Load ``GR_DIR`` (from ``forge-ray train-gr``) and its SID table; a list of
        folders loads an ensemble, the first one's manifest naming the SID table.

        sids: a SIDS_DIR to use instead of the one the model was trained on (e.g. a
            newer version made by ``forge-ray add-items``); same codebook sizes.
        device: ``cuda``, ``cpu``, ...; default the GPU when there is one.
        num_beams: beams of the search (default the model's generation config).
        exclude_history: leave the history's own items out (default: what the model's
            training counts say, as eval-gr's ``auto``; off when they do not say).
        """
        dirs = model_dirs(model_dir)
        model_dir = dirs[0]
        manifest = read_manifest(model_dir, MODEL_KIND)
        sids = sids or manifest.get("sids")
        if not sids:
            raise InputError(model_dir, "the model's manifest names no SID table (trained on AL-GR "
                                        "files?): pass the SIDS_DIR")
        if not Path(sids).is_absolute():
            sids = model_dir / sids
        for member in dirs[1:]:
            read_manifest(member, MODEL_KIND)
        models, vocab = load_models(dirs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        models = [m.to(device) for m in models]
        max_history = int(manifest.get("config", {}).get("data", {}).get("max_history", 20))
        beams = num_beams or int(getattr(models[0].generation_config, "num_beams", 0) or 20)
        if exclude_history is None:
            exclude_history = bool(history_excluded(manifest.get("counts")))
        return cls(models, vocab, SidTable.open(sids), max_history, beams, batch_size, exclude_history)

    def use_sids(self, table: SidTable | str | os.PathLike) -> None:
        """Answer from another SID table (a new version with cold-start items): the
        trie and item tables are rebuilt; the model is unchanged."""
        table = table if isinstance(table, SidTable) else SidTable.open(table)
        if tuple(table.sizes) != tuple(self.vocab.sizes):
            raise InputError(table.path, f"SID table has codebook sizes {list(table.sizes)} but the "
                                         f"model's vocabulary has {list(self.vocab.sizes)}")
        ids, codes = table.arrays()
        self.table, self.trie, self.items = table, SIDTrie(codes, ids, table.sizes), ItemSIDTable(ids, codes)
        self.keys = ItemKeys(*table.item_keys())

    # ---- answering ---------------------------------------------------------------------
    def resolve(self, history: Sequence[str | int], source: str = "history") -> tuple[np.ndarray, list[str]]:
        """Item keys -> ((n,) known item ids, unknown keys); InputError if none is known.

        ``source`` names the history in the error (a file and line, a request).
        """
        ids = self.keys.to_ids(history)
        ids[~self.items.lookup(ids)[1]] = -1  # a key whose item has no SID in this table
        unknown = [str(k) for k, i in zip(history, ids.tolist()) if i < 0]
        ids = ids[ids >= 0]
        if not len(ids):
            shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
            raise InputError(source, f"no known item in the history ({len(unknown)} unknown: {shown})"
                             if unknown else "the history is empty")
        return ids, unknown

    def recommend(self, histories: Sequence[Sequence[str | int]], k: int = 10,
                  sources: Sequence[str] | None = None) -> list[Recommendation]:
        """Top-``k`` items for each history of item keys (see module doc).

        Every history is resolved before any decoding; ``sources`` name them in the
        error of one with no known item (default ``history <i>``).
        """
        sources = sources or [f"history {i}" for i in range(len(histories))]
        resolved = [self.resolve(h, src) for h, src in zip(histories, sources)]
        ranked = self.recommend_ids([ids for ids, _ in resolved], k)
        return [self.answer(items, scores, unknown) for (items, scores), (_, unknown) in zip(ranked, resolved)]

    def answer(self, items: np.ndarray, scores: np.ndarray, unknown: list[str]) -> Recommendation:
        """Ranked item ids and their scores (``recommend_ids``) as a Recommendation."""
        return Recommendation(items.tolist(), self.keys.to_keys(items), [float(s) for s in scores], unknown)

    @torch.no_grad()
    def recommend_ids(self, histories: Sequence[np.ndarray], k: int = 10
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Histories of known item ids -> per history ((<=k,) item ids, (<=k,) scores).

        Decodes in chunks of ``batch_size`` histories; ``max(num_beams, k)`` beams.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        beams = max(self.num_beams, k)
        out = []
        for start in range(0, len(histories), self.batch_size):
            full = [np.asarray(h, np.int64) for h in histories[start:start + self.batch_size]]
            chunk = [h[-self.max_history:] for h in full]
            codes = [self.items.lookup(h)[0] for h in chunk]
            prompts = list(history_input_ids(codes, self.vocab, prompt_eos(self.model.config.is_encoder_decoder)))
            found = generate_sids(self.models, self.vocab, self.trie, prompts, num_beams=beams)
            items = beam_items(self.trie, found.codes, k, full if self.exclude_history else None)
            for row, q in zip(items, range(len(chunk))):
                keep = row >= 0
                out.append((row[keep], self._item_scores(found, q, row[keep])))
        return out

    def _item_scores(self, found, q: int, items: np.ndarray) -> np.ndarray:
        """Score of each expanded item = its SID's beam score."""
        codes, _ = self.items.lookup(items)
        sid_rows = self.trie.sid_rows(codes)
        beam_rows = self.trie.sid_rows(found.codes[q])
        score_of = dict(zip(beam_rows.tolist(), found.scores[q].tolist()))
        return np.asarray([score_of[r] for r in sid_rows.tolist()], dtype=np.float32)
