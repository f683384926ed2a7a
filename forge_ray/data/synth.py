"""FORGE-shaped synthetic data, written in FORGE's own formats, streamed in blocks.

Structure (all of it recorded in ``truth.json``):

- **Hierarchical clusters.** ``branching = [b1, b2, ..]`` gives b1 top clusters, each
  split into b2 children, ...; the leaves are the *fine* clusters. Every node has a
  random unit centre; an item's embedding is ``sum_l scale_l * centre_l(ancestor) +
  noise`` (noise norm ~ ``noise``), L2-normalised, float32.
- **Items.** A latent index ``i`` in ``[0, N)`` is laid out cluster by cluster (fine
  cluster sizes ~ Gamma(2) weights, at least one item each); the file row of latent
  ``i`` is a fixed affine permutation, so clusters are spread over the file (a reader
  of the first shard sees all clusters). Item ids are unique 12-13 digit int64s
  ``id_base + (i * M + K) mod 2**40`` (an odd-multiplier bijection), like FORGE's
  855036080309.
- **Popularity** is Zipf(``zipf_alpha``) twice over: across fine clusters (random
  rank) and, inside a cluster, over the item's rank in it.
- **Pairs** (co-occurrence): ``a`` by popularity; ``b`` from ``a``'s fine cluster with
  ``p_pair_same``, from a sibling fine cluster with ``p_pair_sibling``, else anywhere.
- **Users** drift: each next item stays in the current fine cluster with ``p_stay``,
  moves to another fine cluster under the same top-level cluster with ``p_move``,
  else jumps anywhere by popularity (and drifts on from there); so the history
  predicts the next item much better than global popularity. Timestamps strictly increase
  (gaps 1 s + Exp(mean 1 h)).

Outputs: ``contrastive_data_mask.npz`` (itemEncID, pairs, embeds), 
``reconstruct_data_mask.npz`` (ids, embeds: the first ``reconstruct_fraction`` of
rows, a spread-out subset), ``interactions/part-*.parquet``, ``truth.json``,
``manifest.json``.

Memory bound: one block (``block_rows`` x ``dim`` float32, a few copies) + the cluster
tables (``sum_l prod(b_1..b_l)`` x ``dim`` float32) + the itemEncID dict, which
``np.save`` pickles whole (~100 B/item transient, plus 8 B/item of ids); users are
streamed in blocks of 4096 (nothing per user is kept). :func:`estimate` computes this
bound (and a lower bound of the bytes written) from the config, and :func:`generate`
refuses, in one line giving the figures, a config that cannot fit in the available
memory or disk before writing anything. Deterministic for a given config: every
block draws from ``default_rng([seed, stream, block])``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from forge_ray.config import require
from forge_ray.data.npz import NpzWriter
from forge_ray.data.resources import require_disk, require_memory
from forge_ray.data.schema import DEFAULT_ROWS_PER_SHARD, ShardWriter

CONTRASTIVE_FILE = "contrastive_data_mask.npz"
RECONSTRUCT_FILE = "reconstruct_data_mask.npz"
INTERACTIONS_DIR = "interactions"
KIND = "synthetic"  # manifest kind of a synth output (what --overwrite may replace)
INTERACTIONS_SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False),
                                 pa.field("item_id", pa.int64(), nullable=False),
                                 pa.field("timestamp", pa.int64(), nullable=False)])
_ID_BITS = 40
_ID_MULT = np.uint64(0x9E3779B97F4A7C15 & ((1 << _ID_BITS) - 1) | 1)  # odd: bijective mod 2**40
_ID_ADD = np.uint64(0x5DEECE66D)
_USER_BLOCK = 4096
_T0 = 1_700_000_000  # seconds, Nov 2023


@dataclass
class SynthConfig:
    """Generator parameters (sizes in items/users, probabilities in [0, 1])."""

    items: int = 100_000
    dim: int = 64
    users: int = 10_000
    seed: int = 0
    branching: list[int] = field(default_factory=lambda: [8, 8, 8])
    level_scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    noise: float = 0.1
    zipf_alpha: float = 1.1
    pairs_per_item: float = 1.4
    p_pair_same: float = 0.8
    p_pair_sibling: float = 0.15
    seq_len_mean: float = 20.0
    seq_len_min: int = 5
    seq_len_max: int = 100
    p_stay: float = 0.6
    p_move: float = 0.3
    reconstruct_fraction: float = 0.6
    block_rows: int = 65_536
    id_base: int = 100_000_000_000

    def __post_init__(self):
        require(self.dim > 0, "dim must be positive")
        require(self.users >= 0, "users must be >= 0")
        require(len(self.branching) >= 1 and min(self.branching) >= 1, "branching needs >= 1 level of sizes >= 1")
        require(len(self.level_scales) == len(self.branching), "level_scales needs one scale per branching level")
        require(self.items >= self.fine_clusters, f"items must be >= the {self.fine_clusters} fine clusters")
        require(self.items < 2**31, "items must be < 2**31")
        require(0 <= self.p_pair_same + self.p_pair_sibling <= 1, "p_pair_same + p_pair_sibling must be in [0, 1]")
        require(0 <= self.p_stay + self.p_move <= 1, "p_stay + p_move must be in [0, 1]")
        require(1 <= self.seq_len_min <= self.seq_len_max, "need 1 <= seq_len_min <= seq_len_max")
        require(self.seq_len_min <= self.seq_len_mean, "seq_len_mean must be >= seq_len_min")
        require(0 < self.reconstruct_fraction <= 1, "reconstruct_fraction must be in (0, 1]")
        require(self.zipf_alpha > 0 and self.noise >= 0 and self.pairs_per_item >= 0,
                "zipf_alpha > 0, noise >= 0, pairs_per_item >= 0")
        require(self.block_rows > 0, "block_rows must be positive")

    @property
    def fine_clusters(self) -> int:
        return int(np.prod(self.branching))


class Structure:
    """The small tables that define the data: cluster sizes, centres, popularity."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        n, f = cfg.items, cfg.fine_clusters
        rng = np.random.default_rng([cfg.seed, 0])
        w = rng.gamma(2.0, size=f)
        extra = np.floor(np.cumsum(w) / w.sum() * (n - f)).astype(np.int64)
        self.sizes = np.diff(np.concatenate([[0], extra])) + 1          # (F,) >= 1
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])  # latent start of each
        self.centres = []                                                # level l: (prod b[:l+1], D)
        for level in range(len(cfg.branching)):
            c = rng.standard_normal((int(np.prod(cfg.branching[: level + 1])), cfg.dim))
            self.centres.append((c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32))
        rank = rng.permutation(f)
        p = (rank + 1.0) ** -cfg.zipf_alpha
        self.cluster_cdf = np.cumsum(p) / p.sum()
        # Row r holds latent (r * A + B) mod N, A coprime to N: spreads clusters over rows.
        a = int(n * 0.6180339887) | 1
        while math.gcd(a, n) != 1:
            a += 1
        self.perm_a, self.perm_b = a, int(rng.integers(n))

    def latent(self, rows: np.ndarray) -> np.ndarray:
        return (np.asarray(rows, np.int64) * self.perm_a + self.perm_b) % self.cfg.items

    def fine(self, latent: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, latent, side="right") - 1

    def ancestors(self, fine: np.ndarray) -> np.ndarray:
        """(n, L) cluster index at each level (level L-1 = the fine cluster)."""
        b = self.cfg.branching
        return np.stack([fine // int(np.prod(b[l + 1:])) for l in range(len(b))], axis=1)

    def item_ids(self, latent: np.ndarray) -> np.ndarray:
        x = np.asarray(latent).astype(np.uint64) * _ID_MULT + _ID_ADD
        return (x & np.uint64((1 << _ID_BITS) - 1)).astype(np.int64) + self.cfg.id_base

    def embeddings(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        anc = self.ancestors(self.fine(self.latent(rows)))
        emb = rng.standard_normal((len(rows), self.cfg.dim), dtype=np.float32)
        emb *= self.cfg.noise / math.sqrt(self.cfg.dim)
        for level, scale in enumerate(self.cfg.level_scales):
            emb += scale * self.centres[level][anc[:, level]]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return emb

    def popular_clusters(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cluster_cdf, rng.random(n)), len(self.sizes) - 1)

    def pick_in(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A latent item per cluster, Zipf over the item's rank inside its cluster."""
        size = self.sizes[clusters].astype(np.float64)
        u, s = rng.random(len(clusters)), 1.0 - self.cfg.zipf_alpha
        x = np.exp(u * np.log(size + 1)) if abs(s) < 1e-9 else (((size + 1) ** s - 1) * u + 1) ** (1 / s)
        rank = np.clip(np.floor(x).astype(np.int64) - 1, 0, self.sizes[clusters] - 1)
        return self.starts[clusters] + rank

    def sibling(self, clusters: np.ndarray, rng: np.random.Generator, level: int) -> np.ndarray:
        """A uniform fine cluster sharing the ancestor at ``level`` (0 = top) with ``clusters``."""
        span = int(np.prod(self.cfg.branching[level + 1:]))
        return clusters // span * span + rng.integers(0, span, len(clusters))


def estimate(cfg: SynthConfig) -> dict[str, int]:
    """Peak memory (bytes, an upper estimate) and bytes written (a lower bound) of
    :func:`generate` for ``cfg``, from the arguments alone.

    Memory = the cluster tables + the largest phase: an items block (3 float32
    copies of ``block_rows x dim``), the itemEncID build (~160 B/item: ids, the
    Python dict ``np.save`` pickles), a pairs block (~16 int64 per row) or a users
    block (~10 int64 per ``4096 x seq_len_max`` cell, plus one buffered shard), plus
    ~128 MiB of library working memory (Parquet writer, zstd). Calibrated against
    peak RSS growth (measured: 3 block copies, ~140 B/item, ~100 MiB for users; the
    estimate is 1.2-1.9x the measured peaks).
    """
    levels = [math.prod(cfg.branching[: l + 1]) for l in range(len(cfg.branching))]
    block = min(cfg.block_rows, cfg.items)
    tables = 4 * cfg.dim * sum(levels) + 16 * cfg.dim * max(levels) + 64 * cfg.fine_clusters
    phases = (12 * cfg.dim * block,
              160 * cfg.items,
              128 * min(cfg.block_rows, max(1, round(cfg.pairs_per_item * cfg.items))),
              80 * _USER_BLOCK * cfg.seq_len_max + 48 * DEFAULT_ROWS_PER_SHARD if cfg.users else 0)
    n_rec = max(1, int(round(cfg.reconstruct_fraction * cfg.items)))
    written = (4 * cfg.dim * (cfg.items + n_rec) + 8 * (n_rec + cfg.items)
               + 16 * round(cfg.pairs_per_item * cfg.items)
               + 4 * cfg.seq_len_min * cfg.users)  # >= 4 B per interaction (zstd Parquet: ~6)
    return {"memory": (128 << 20) + tables + max(phases), "disk": written}


def check_fits(cfg: SynthConfig, out: str | Path) -> None:
    """Refuse (one line, the estimate in it) a config whose :func:`estimate` exceeds
    the available memory or the free disk space at ``out``."""
    need = estimate(cfg)
    what = f"synth ({cfg.items:,} items x {cfg.dim:,} dims, {cfg.users:,} users)"
    require_memory(need["memory"], None, what, "lower dim, items or block_rows")
    require_disk(need["disk"], out, None, what, "lower items, dim or users, or write elsewhere")


def synth(out: str | Path, cfg: SynthConfig | None = None, *, overwrite: bool = False,
          progress: bool = True) -> dict:
    """The ``synth`` stage: generate into the folder ``out`` (created atomically, with a
    manifest of kind :data:`KIND`); returns the manifest. Runs in process (no Ray)."""
    from forge_ray.io import atomic_dir, write_manifest

    cfg = cfg or SynthConfig()
    with atomic_dir(out, overwrite, kind=KIND) as tmp:
        counts = generate(cfg, tmp, progress=progress)
        return write_manifest(tmp, KIND, generator="forge_ray.data.synth", config=asdict(cfg),
                              counts=counts,
                              files={"contrastive": CONTRASTIVE_FILE, "reconstruct": RECONSTRUCT_FILE,
                                     "interactions": f"{INTERACTIONS_DIR}/", "truth": "truth.json"})


def generate(cfg: SynthConfig, out: str | Path, progress: bool = True) -> dict:
    """Write the synthetic dataset into the existing folder ``out``; returns counts.

    Refuses (:func:`check_fits`) before writing when it cannot fit.
    """
    out = Path(out)
    check_fits(cfg, out)
    st = Structure(cfg)
    n, n_rec = cfg.items, max(1, int(round(cfg.reconstruct_fraction * cfg.items)))
    blocks = range(0, n, cfg.block_rows)
    with NpzWriter(out / CONTRASTIVE_FILE) as con, NpzWriter(out / RECONSTRUCT_FILE) as rec:
        with con.stream("embeds", np.float32, (n, cfg.dim)) as ce, \
                rec.stream("embeds", np.float32, (n_rec, cfg.dim)) as re_:
            for b, r0 in enumerate(tqdm(blocks, desc="synth items", disable=not progress)):
                rows = np.arange(r0, min(n, r0 + cfg.block_rows))
                emb = st.embeddings(rows, np.random.default_rng([cfg.seed, 1, b]))
                ce.write(emb)
                if r0 < n_rec:
                    re_.write(emb[: n_rec - r0])
        with rec.stream("ids", np.int64, (n_rec,)) as ri:
            for r0 in range(0, n_rec, cfg.block_rows):
                ri.write(st.item_ids(st.latent(np.arange(r0, min(n_rec, r0 + cfg.block_rows)))))
        n_pairs, same = _write_pairs(cfg, st, con, progress)
        ids = st.item_ids(st.latent(np.arange(n)))
        con.add_pickled("itemEncID", dict(zip(ids.tolist(), range(n))))
        del ids
    seq = _write_interactions(cfg, st, out / INTERACTIONS_DIR, progress)
    counts = {"items": n, "reconstruct_items": n_rec, "pairs": n_pairs, "users": cfg.users,
              "interactions": seq["interactions"]}
    truth = {
        "description": "hierarchically clustered items; Zipf popularity; pairs mostly within "
                       "fine clusters; user sequences drifting between fine clusters of one top-level cluster",
        "config": asdict(cfg),
        "fine_clusters": cfg.fine_clusters,
        "cluster_size": {"min": int(st.sizes.min()), "mean": float(st.sizes.mean()),
                         "max": int(st.sizes.max())},
        "row_to_latent": f"latent = (row * {st.perm_a} + {st.perm_b}) mod {n}",
        "latent_to_item_id": f"{cfg.id_base} + (latent * {int(_ID_MULT)} + {int(_ID_ADD)}) mod 2**{_ID_BITS}",
        "reconstruct_rows": f"contrastive rows [0, {n_rec})",
        "pairs_same_fine_cluster": same,
        "sequences": seq,
        "counts": counts,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return counts


def _write_pairs(cfg: SynthConfig, st: Structure, con: NpzWriter, progress: bool) -> tuple[int, float]:
    total = int(round(cfg.pairs_per_item * cfg.items))
    same = 0
    with con.stream("pairs", np.int64, (total, 2)) as w:
        for b, p0 in enumerate(tqdm(range(0, total, cfg.block_rows), desc="synth pairs",
                                    disable=not progress)):
            rng = np.random.default_rng([cfg.seed, 2, b])
            m = min(cfg.block_rows, total - p0)
            ca = st.popular_clusters(rng, m)
            a = st.pick_in(ca, rng)
            u = rng.random(m)
            parent = max(0, len(cfg.branching) - 2)
            cb = np.where(u < cfg.p_pair_same, ca,
                          np.where(u < cfg.p_pair_same + cfg.p_pair_sibling,
                                   st.sibling(ca, rng, parent), st.popular_clusters(rng, m)))
            bb = st.pick_in(cb, rng)
            # a pair of an item with itself teaches nothing: take the next item of its cluster
            clash = (bb == a) & (st.sizes[cb] > 1)
            bb[clash] = st.starts[cb[clash]] + (bb[clash] - st.starts[cb[clash]] + 1) % st.sizes[cb[clash]]
            same += int((ca == cb).sum())
            w.write(np.stack([st.item_ids(a), st.item_ids(bb)], axis=1))
    return total, same / max(1, total)


def _write_interactions(cfg: SynthConfig, st: Structure, folder: Path, progress: bool) -> dict:
    length_sum = length_max = 0  # running stats: nothing kept per user
    writer = ShardWriter(folder, INTERACTIONS_SCHEMA)
    for b, u0 in enumerate(tqdm(range(0, cfg.users, _USER_BLOCK), desc="synth users",
                                disable=not progress)):
        rng = np.random.default_rng([cfg.seed, 3, b])
        m = min(_USER_BLOCK, cfg.users - u0)
        extra = cfg.seq_len_mean - cfg.seq_len_min
        length = cfg.seq_len_min + (rng.geometric(1 / (extra + 1), m) - 1 if extra > 0 else 0)
        length = np.minimum(length, cfg.seq_len_max)
        cur = st.popular_clusters(rng, m)
        items = np.empty((m, cfg.seq_len_max), np.int64)
        for t in range(int(length.max())):
            if t:
                u = rng.random(m)
                moved = st.sibling(cur, rng, 0)        # same top-level cluster
                jumped = st.popular_clusters(rng, m)
                cur = np.where(u < cfg.p_stay, cur, np.where(u < cfg.p_stay + cfg.p_move, moved, jumped))
            items[:, t] = st.pick_in(cur, rng)
        gaps = 1 + rng.exponential(3600.0, (m, cfg.seq_len_max)).astype(np.int64)
        times = _T0 + rng.integers(0, 90 * 86400, (m, 1)) + np.cumsum(gaps, axis=1)
        mask = np.arange(cfg.seq_len_max)[None, :] < length[:, None]
        users = np.broadcast_to(np.arange(u0, u0 + m, dtype=np.int64)[:, None], mask.shape)
        writer.write(pa.table({"user_id": users[mask], "item_id": st.item_ids(items[mask]),
                               "timestamp": times[mask]}))
        length_sum += int(length.sum())
        length_max = max(length_max, int(length.max()))
    total = writer.close()
    return {"interactions": int(total),
            "length_mean": length_sum / cfg.users if cfg.users else 0.0,
            "length_max": length_max,
            "p_stay": cfg.p_stay, "p_move_within_top_cluster": cfg.p_move}
