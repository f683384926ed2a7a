"""The interface every SID quantizer offers, and the pieces they share.

A quantizer maps (N, D) float32 embeddings to (N, L) int64 codes, one code per
level, level l's code in ``[0, sizes[l])``. All of them are residual: level l
quantizes what levels < l left over, so the last level can be re-ranked under a
fixed prefix (FORGE's collision handling moves overflow items to the next-nearest
level-L code under the same level-1..L-1 prefix).

Saved form: a folder with ``quantizer.json`` (``{"type": ..., "sizes": ...,
"config": ...}``) plus the type's weight file;
:func:`forge_ray.core.quantize.registry.load_quantizer` dispatches on ``type``. Weights
are stored as safetensors / plain ``.npz`` read with ``allow_pickle=False``: nothing here runs an unpickler on user files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from forge_ray.errors import InputError
from forge_ray.io import read_json_in

QUANTIZER_FILE = "quantizer.json"
Distance = Literal["l2", "cosine"]


@runtime_checkable
class Quantizer(Protocol):
    """What the SID-assignment stage needs from a quantizer (RQ-VAE, RQ-KMeans, ...)."""

    sizes: list[int]  # codebook size per level, L entries

    def fit(self, x: np.ndarray, *args, **kwargs) -> "Quantizer":
        """Train on (N, D) float32 embeddings; returns self."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, L) int64 codes (the inference assignment)."""

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) int64 codes -> (N, D) float32 reconstructions."""

    def rank_last_level(self, x: np.ndarray, k: int,
                        prefix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (codes (N, L) int64, candidates (N, k) int64): last-level codes, best first,
        under each item's own first L-1 codes (or under ``prefix``, (N, L-1) int64 codes
        given, e.g. those an earlier ``encode`` chose); ``candidates[:, 0] == codes[:, -1]``."""

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``quantizer.json`` and weights into ``folder`` (created if missing)."""

    def to(self, device: str) -> "Quantizer":
        """Compute ``encode`` / ``rank_last_level`` / ``decode`` on ``device`` (``cpu``,
        ``cuda``) from now on, numpy in and out; returns self."""


# ----------------------------------------------------------------------------- nearest codes

def as_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(a)``, copying ``a`` first if it is read-only.

    Arrays that come through Ray (task arguments, ``ray.get``, Ray Data batches) are
    read-only views of the object store; a tensor sharing their memory would be
    writable, which torch warns about.
    """
    return torch.from_numpy(a if a.flags.writeable else a.copy())


# Cost-matrix entries computed at a time by nearest_codes / ranked_codes (16 MiB of
# float32): a (rows, K) block stays in cache instead of a fresh (B, K) buffer being
# written, faulted in and re-read per pass; 1.9-2.3x faster for FORGE's K = 8192 at
# 64-d (bench/bench_code_search.py).
COST_BLOCK = 1 << 22


def code_costs(r: torch.Tensor, codebook: torch.Tensor, distance: Distance = "l2",
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Assignment cost of every row to every code; lower is better.

    Args:
        r: (B, d) residuals.  codebook: (K, d).  bias: optional (K,) subtracted from
            the cost (balanced quantizers learn one per code; see balanced.py).
    Returns:
        (B, K): squared L2 distance, or ``1 - cosine`` for ``distance="cosine"``.
    """
    if distance == "cosine":
        cost = (torch.nn.functional.normalize(r, dim=1) @
                torch.nn.functional.normalize(codebook, dim=1).T).neg_().add_(1.0)
    else:
        # ||c||^2 - 2 r.c in one GEMM (beta = 1 over the broadcast norms), then + ||r||^2
        # in place: one (B, K) buffer, never (B, K, d); clamp rounding noise.
        cost = torch.addmm(codebook.pow(2).sum(1)[None, :], r, codebook.T, alpha=-2.0)
        cost = cost.add_(r.pow(2).sum(1, keepdim=True)).clamp_min_(0.0)
    if bias is not None:
        cost = cost.sub_(bias[None, :])
    return cost


def _by_row_blocks(fn: Callable[[torch.Tensor], torch.Tensor], r: torch.Tensor, k: int) -> torch.Tensor:
    """``fn`` over row blocks of ``r`` holding at most :data:`COST_BLOCK` costs each."""
    rows = max(1, COST_BLOCK // max(k, 1))
    if len(r) <= rows:
        return fn(r)
    return torch.cat([fn(r[i:i + rows]) for i in range(0, len(r), rows)])


def nearest_codes(r: torch.Tensor, codebook: torch.Tensor, distance: Distance = "l2",
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) residuals -> (B,) int64 index of the lowest-cost code."""
    return _by_row_blocks(lambda rb: code_costs(rb, codebook, distance, bias).argmin(dim=1), r, len(codebook))


def ranked_codes(r: torch.Tensor, codebook: torch.Tensor, k: int, distance: Distance = "l2",
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) residuals -> (B, k) int64 codes, lowest cost first (ties: lower index)."""
    def block(rb: torch.Tensor) -> torch.Tensor:
        cost = code_costs(rb, codebook, distance, bias)
        if cost.device.type == "cpu" and cost.dtype == torch.float32:
            return torch.from_numpy(smallest_first(cost.detach().numpy(), k))
        # stable sort so candidates[:, 0] agrees with argmin's lowest-index tie-breaking
        return torch.sort(cost, dim=1, stable=True).indices[:, :k]

    return _by_row_blocks(block, r, len(codebook))


def smallest_first(cost: np.ndarray, k: int) -> np.ndarray:
    """(B, K) float32 costs -> (B, k) int64 column indices, lowest cost first, ties by
    lower index: the first k of a stable argsort, exactly.

    Why not ``torch.sort(stable=True)``: on CPU it took 9.6 s per 1M rows of 256 costs
    (one thread), the whole cost of strategy ``cap``'s ranking. Here each cost becomes
    one int64 key, (order-preserving int32 image of its float32 bits) << 32 | index,
    and numpy's vectorised integer sort orders those: 2.0 s per 1M rows at K = 256,
    70 s against 513 s at K = 8192 (where a partition first keeps only k keys).
    """
    bits = (cost + np.float32(0.0)).view(np.int32)  # + 0: -0.0 becomes +0.0, its equal
    # IEEE floats order like sign-magnitude integers: flipping the magnitude bits of
    # the negatives makes the int32 order the float order. In place: each pass over
    # the (B, K) block costs as much as the sort.
    ordered = bits >> 31
    ordered &= np.int32(0x7FFFFFFF)
    ordered ^= bits
    keys = ordered.astype(np.int64)
    keys <<= 32
    keys |= np.arange(cost.shape[1], dtype=np.int64)
    if 4 * k <= cost.shape[1]:  # a partition pays only when it drops most of the row
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    keys = keys[:, :k]
    keys &= np.int64(0xFFFFFFFF)
    return keys


# ----------------------------------------------------------------------------- helpers

def batched(fn: Callable[..., np.ndarray | tuple], x: np.ndarray, batch_size: int,
            *more: np.ndarray) -> np.ndarray | tuple:
    """Apply ``fn`` to row slices of ``x`` (and the same slices of the arrays ``more``,
    as further arguments) and concatenate: peak memory is one batch of ``fn``'s
    intermediates (e.g. B x K costs) plus the outputs."""
    outs = [fn(x[i:i + batch_size], *(m[i:i + batch_size] for m in more))
            for i in range(0, max(len(x), 1), batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outs))
    return np.concatenate(outs)


def check_embeddings(x: np.ndarray, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    """Validate (N, D) input and return it as C-contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(what, f"expected a 2-D (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise InputError(what, f"expected {dim}-d embeddings, got {x.shape[1]}-d")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(what, "contains NaN or infinite values")
    return x


def check_codes(codes: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Validate (N, L) codes against per-level sizes; return int64."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != len(sizes):
        raise InputError("codes", f"expected shape (N, {len(sizes)}), got {codes.shape}")
    if len(codes) and ((codes < 0).any() or (codes >= np.asarray(sizes)[None, :]).any()):
        raise InputError("codes", f"code out of range for level sizes {sizes}")
    return codes


def given_prefix(prefix: np.ndarray, n: int, sizes: list[int]) -> np.ndarray:
    """Validate the (n, L-1) ``prefix`` codes given to ``rank_last_level`` for n rows
    (``sizes``: the first L-1 levels' sizes); return int64."""
    prefix = check_codes(prefix, sizes)
    if len(prefix) != n:
        raise InputError("prefix", f"{len(prefix)} rows of prefix codes for {n} embeddings")
    return prefix


def write_quantizer_json(folder: str | os.PathLike, qtype: str, sizes: list[int],
                         config: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"type": qtype, "sizes": [int(s) for s in sizes], "config": config}
    (folder / QUANTIZER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_quantizer_json(folder: str | os.PathLike, qtype: str | None = None) -> dict:
    path = Path(folder) / QUANTIZER_FILE
    meta = read_json_in(folder, QUANTIZER_FILE, "not a saved quantizer", "quantizer description")
    if not isinstance(meta, dict) or "type" not in meta or "config" not in meta:
        raise InputError(path, "missing 'type' or 'config'")
    if qtype is not None and meta["type"] != qtype:
        raise InputError(folder, f"expected a {qtype!r} quantizer, found {meta['type']!r}")
    return meta


def saved_config_and_weights(folder: str | os.PathLike, qtype: str, config_cls: type,
                             weights_file: str) -> tuple[Any, Path]:
    """A saved quantizer's typed config and the path of its weights file (checked to exist)."""
    meta = read_quantizer_json(folder, qtype)
    try:
        config = config_cls(**meta["config"])
    except (TypeError, ValueError) as e:
        raise InputError(Path(folder) / QUANTIZER_FILE, f"bad config: {e}") from None
    path = Path(folder) / weights_file
    if not path.is_file():
        raise InputError(folder, f"missing {weights_file}")
    return config, path
