"""Learning-rate schedule shared by every trainer (single-process and Ray Train)."""

from __future__ import annotations

import math


def warmup_cosine_factor(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up over ``warmup`` steps,
    then cosine decay from 1 to ``min_ratio`` at step ``total`` (flat after).

    Bind it with ``functools.partial`` for ``LambdaLR``, not a callable object:
    LambdaLR checkpoints a callable object's attributes and would restore the old
    ``total`` when a resumed run is asked to train longer.
    """
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
