"""SID codes, token strings and packing.

A SID is L integer codes, one per level; level l's code lies in ``[0, sizes[l])``.
FORGE writes level l's code c as the token ``C{c + offset_l}`` where ``offset_l`` is
the sum of the sizes of the levels before it (``l * K`` when every level has K
codes, so level 2 of a 3 x 8192 SID uses C8192..C16383). A SID string is its L
tokens concatenated, e.g. ``C1442C14117C19114``.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_TOKEN = re.compile(r"C(\d+)")


def level_offsets(sizes: Sequence[int]) -> np.ndarray:
    """(L,) int64 token offset of each level: ``[0, s0, s0+s1, ...]``."""
    return np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1]]).astype(np.int64)


def codes_to_tokens(codes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(N, L) codes -> (N, L) global token numbers (the N in ``C{N}``)."""
    codes = np.asarray(codes, dtype=np.int64)
    _check_codes(codes, sizes)
    return codes + level_offsets(sizes)[None, :]


def tokens_to_codes(tokens: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(N, L) global token numbers -> (N, L) per-level codes; ValueError if off-level."""
    tokens = np.asarray(tokens, dtype=np.int64)
    codes = tokens - level_offsets(sizes)[None, : tokens.shape[1]]
    _check_codes(codes, sizes)
    return codes


def sid_string(codes: Sequence[int], sizes: Sequence[int]) -> str:
    """One SID's codes -> ``"C..C..C.."``."""
    offs = level_offsets(sizes)
    return "".join(f"C{int(c) + int(o)}" for c, o in zip(codes, offs))


def sid_strings(codes: np.ndarray, sizes: Sequence[int]) -> list[str]:
    """(N, L) codes -> N SID strings."""
    tokens = codes_to_tokens(codes, sizes)
    return ["".join(f"C{t}" for t in row) for row in tokens.tolist()]


def parse_tokens(text: str) -> list[int]:
    """``"C12C8200..."`` -> [12, 8200, ...] global token numbers.

    Raises ValueError when anything other than ``C<digits>`` tokens is present.
    """
    text = text.strip()
    nums = _TOKEN.findall(text)
    if "".join(f"C{n}" for n in nums) != text:
        raise ValueError(f"not a sequence of C<number> tokens: {text[:60]!r}")
    return [int(n) for n in nums]


def parse_sid_sequence(text: str, sizes: Sequence[int]) -> np.ndarray:
    """A concatenated history of SIDs -> (n_items, L) codes.

    The token count must be a multiple of L and each token must fall in its level's
    range; ValueError otherwise.
    """
    tokens = parse_tokens(text)
    n_levels = len(sizes)
    if len(tokens) % n_levels:
        raise ValueError(f"{len(tokens)} tokens is not a multiple of {n_levels} levels")
    return tokens_to_codes(token_array(tokens).reshape(-1, n_levels), sizes)


def token_array(numbers: Sequence[int | str]) -> np.ndarray:
    """Token numbers (the N of ``C{N}``, as ints or digit strings) -> (n,) int64.

    ValueError when one does not fit int64 (``C99999999999999999999`` in a corrupt
    file), instead of numpy's OverflowError.
    """
    try:
        return np.asarray([int(n) for n in numbers], dtype=np.int64)
    except OverflowError:
        raise ValueError(f"a C-token number exceeds int64 ({max(map(int, numbers))})") from None


def pack_codes(codes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """(N, L) codes -> (N,) int64 mixed-radix key, unique per full SID.

    Used to group items by SID and as a synthetic item id when a source (AL-GR)
    names items only by SID. Requires prod(sizes) < 2**63.
    """
    codes = np.asarray(codes, dtype=np.int64)
    _check_codes(codes, sizes)
    if float(np.prod(np.asarray(sizes, dtype=np.float64))) >= 2.0**63:
        raise ValueError(f"codebook sizes {list(sizes)} do not pack into int64")
    key = np.zeros(codes.shape[0], dtype=np.int64)
    for level, size in enumerate(sizes[: codes.shape[1]]):
        key = key * int(size) + codes[:, level]
    return key


def unpack_codes(keys: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_codes`: (N,) int64 -> (N, L) codes."""
    keys = np.asarray(keys, dtype=np.int64).copy()
    out = np.empty((keys.shape[0], len(sizes)), dtype=np.int64)
    for level in range(len(sizes) - 1, -1, -1):
        out[:, level] = keys % sizes[level]
        keys //= sizes[level]
    return out


def check_codes(codes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Return ``codes`` as int64 after checking shape and per-level ranges (ValueError)."""
    codes = np.asarray(codes, dtype=np.int64)
    _check_codes(codes, sizes)
    return codes


def _check_codes(codes: np.ndarray, sizes: Sequence[int]) -> None:
    if codes.ndim != 2 or codes.shape[1] > len(sizes):
        raise ValueError(f"codes of shape {codes.shape} do not fit {len(sizes)} levels")
    hi = np.asarray(sizes[: codes.shape[1]], dtype=np.int64)[None, :]
    if codes.size and ((codes < 0).any() or (codes >= hi).any()):
        raise ValueError("code outside its level's codebook")


def bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """(n,) int64 keys -> their (n,) buckets in [0, buckets), well mixed (Fibonacci
    hashing: sequential item ids and packed codes spread evenly)."""
    mixed = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(buckets)).astype(np.int64)
