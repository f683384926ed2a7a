"""Saved quantizers by type: the one place that knows every quantizer class.

``quantizer.json``'s ``type`` names the class (its ``TYPE``); a new quantizer is one
module implementing :class:`~forge_ray.core.quantize.base.Quantizer` plus one entry in
:data:`QUANTIZERS`. Kept apart from ``base`` so the classes can import ``base``
without a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path

from forge_ray.core.quantize.base import QUANTIZER_FILE, Quantizer, read_quantizer_json
from forge_ray.core.quantize.rq_kmeans import RQKMeans
from forge_ray.core.quantize.rqvae import RQVAE
from forge_ray.errors import InputError

QUANTIZERS: dict[str, type] = {RQVAE.TYPE: RQVAE, RQKMeans.TYPE: RQKMeans}


def load_quantizer(folder: str | os.PathLike, device: str = "cpu") -> Quantizer:
    """Load any saved quantizer (dispatches on ``quantizer.json``'s ``type``), ready to
    encode on ``device``."""
    meta = read_quantizer_json(folder)
    cls = QUANTIZERS.get(meta["type"])
    if cls is None:
        raise InputError(Path(folder) / QUANTIZER_FILE,
                         f"unknown quantizer type {meta['type']!r}; known: {', '.join(QUANTIZERS)}")
    return cls.load(folder).to(device)


def quantizer_dim(q: Quantizer) -> int:
    """Input embedding width of a loaded quantizer."""
    config = getattr(q, "config", None)
    if hasattr(config, "in_dim"):
        return int(config.in_dim)
    return int(q.codebooks[0].shape[1])
