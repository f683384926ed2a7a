"""A vectorised trie of the SIDs that exist, for constrained decoding and item lookup.

Representation (no Python nodes): for each depth d = 1..L the sorted unique
mixed-radix keys of all length-d prefixes (``prefix_keys[d-1]``, int64). The
children of a length-d prefix key p are exactly the length-(d+1) keys in
``[p * size_d, (p + 1) * size_d)``, a contiguous run found with two
``np.searchsorted`` calls; so the allowed next codes of a whole batch of beams come
out as one boolean (R, size_d) mask with no loop over beams or vocabulary.

Full SIDs map to items CSR-style: ``sid_keys`` (M,) sorted, ``item_ptr`` (M+1,),
``item_ids`` grouped by SID in ascending item id order (deterministic expansion).

Memory: about 8 bytes per distinct prefix per level plus 8 bytes per item (250M
items: ~2 GB for item ids, a few GB for prefixes) on the process that decodes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from forge_ray.core.arrays import sorted_unique
from forge_ray.core.sid.codes import pack_codes


class SIDTrie:
    """Valid SIDs (codes per level) and the items behind each of them."""

    def __init__(self, codes: np.ndarray, item_ids: np.ndarray, sizes: Sequence[int]):
        """codes: (N, L) int64 SID of each item; item_ids: (N,) int64 (unique)."""
        codes = np.asarray(codes, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != item_ids.shape[0]:
            raise ValueError(f"codes {codes.shape} and item_ids {item_ids.shape} disagree")
        self.sizes = tuple(int(s) for s in sizes)
        if codes.shape[1] != len(self.sizes):
            raise ValueError(f"codes have {codes.shape[1]} levels, sizes {list(self.sizes)}")
        self.prefix_keys = [sorted_unique(pack_codes(codes[:, : d + 1], self.sizes))
                            for d in range(len(self.sizes))]
        full = pack_codes(codes, self.sizes)
        order = np.lexsort((item_ids, full))
        self.item_ids = item_ids[order]
        self.sid_keys, counts = np.unique(full[order], return_counts=True)
        self.item_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def n_levels(self) -> int:
        return len(self.sizes)

    @property
    def n_sids(self) -> int:
        return int(self.sid_keys.shape[0])

    # ---- decoding support ---------------------------------------------------------
    def allowed(self, prefix_keys: np.ndarray, depth: int) -> np.ndarray:
        """Mask of allowed next codes.

        Args:
            prefix_keys: (R,) int64 packed keys of length-``depth`` prefixes (ignored
                when depth == 0); a key < 0 marks a dead beam (no children).
            depth: number of codes already decoded, 0..L-1.
        Returns:
            (R, sizes[depth]) bool, True where prefix + code is a prefix of a real SID.
        """
        size = self.sizes[depth]
        keys = np.asarray(prefix_keys, dtype=np.int64)
        mask = np.zeros((keys.shape[0], size), dtype=bool)
        children = self.prefix_keys[depth]
        if depth == 0:
            mask[:, children] = True
            return mask
        lo = np.searchsorted(children, keys * size, side="left")
        hi = np.searchsorted(children, (keys + 1) * size, side="left")
        hi = np.where(keys < 0, lo, hi)
        counts = hi - lo
        rows = np.repeat(np.arange(keys.shape[0]), counts)
        # positions lo[r], lo[r]+1, ..., hi[r]-1 for every row r, without a loop
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        idx = starts + np.arange(rows.shape[0])
        mask[rows, children[idx] - keys[rows] * size] = True
        return mask

    def contains(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) codes (any value, -1 allowed) -> (N,) bool: is it an existing SID."""
        return self.sid_rows(codes) >= 0

    # ---- items --------------------------------------------------------------------
    def sid_rows(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) codes (any value) -> (N,) int64 row in ``sid_keys``, -1 if not a SID."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.n_levels)
        out = np.full(codes.shape[0], -1, dtype=np.int64)
        ok = ((codes >= 0) & (codes < np.asarray(self.sizes))).all(axis=1)
        if ok.any() and self.n_sids:
            keys = pack_codes(codes[ok], self.sizes)
            pos = np.minimum(np.searchsorted(self.sid_keys, keys), self.n_sids - 1)
            out[ok] = np.where(self.sid_keys[pos] == keys, pos, -1)
        return out

    def items_of(self, codes: np.ndarray) -> list[np.ndarray]:
        """(N, L) codes -> N arrays of item ids (empty for a SID that does not exist)."""
        return [self.item_ids[self.item_ptr[i]: self.item_ptr[i + 1]] if i >= 0
                else self.item_ids[:0] for i in self.sid_rows(codes).tolist()]

    def expand(self, codes: np.ndarray, k: int) -> np.ndarray:
        """Ranked SIDs -> ranked items, as FORGE's HitRate does.

        Args:
            codes: (Q, N, L) SIDs per query in beam order; rows with a -1 code or not
                in the trie contribute no items.
            k: how many items to keep per query.
        Returns:
            (Q, k) int64 item ids in beam order (items of one SID in ascending id
            order), padded with -1 when the beams hold fewer than k items.
        """
        codes = np.asarray(codes, dtype=np.int64)
        q, n, _ = codes.shape
        idx = self.sid_rows(codes.reshape(q * n, -1))
        counts = np.where(idx >= 0, self.item_ptr[idx + 1] - self.item_ptr[np.maximum(idx, 0)], 0)
        out = np.full((q, k), -1, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return out
        src_row = np.repeat(np.arange(q * n), counts)
        # offset of each item inside its SID's run
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        items = self.item_ids[self.item_ptr[idx[src_row]] + within]
        query = src_row // n
        # rank of each item within its query = running count since the query's start
        per_query = np.bincount(query, minlength=q)
        rank = np.arange(total) - np.repeat(np.cumsum(per_query) - per_query, per_query)
        keep = rank < k
        out[query[keep], rank[keep]] = items[keep]
        return out
