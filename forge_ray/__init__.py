"""forge_ray: semantic IDs and generative retrieval, FORGE-style, on Ray.

The public surface is listed in ``__all__``; everything else is internal.
Algorithms live in :mod:`forge_ray.core` (no Ray imports); Ray and DeepSpeed are
used only in :mod:`forge_ray.distributed`.
"""

__version__ = "0.1.0"

from forge_ray import ray_env

ray_env.default_to_loopback()  # before anything imports ray (see forge_ray.ray_env)

from forge_ray.config import load_config  # noqa: E402
from forge_ray.errors import ConfigError, ForgeRayError, InputError  # noqa: E402
from forge_ray.io import atomic_dir, read_manifest, write_manifest  # noqa: E402

# Heavier parts (torch, transformers) load on first use, so `import forge_ray` stays cheap.
# The stages, one function each, called alike: stage(inputs..., out, cfg=None, *, overwrite=False).
_LAZY = {"Recommender": "forge_ray.serving.recommender", "Recommendation": "forge_ray.serving.recommender",
         "SidTable": "forge_ray.sid_table", "add_items": "forge_ray.serving.add_items",
         "synth": "forge_ray.data.synth", "ingest": "forge_ray.distributed.ingest",
         "embed": "forge_ray.distributed.embed", "train_sid": "forge_ray.distributed.train_quantizer",
         "assign": "forge_ray.distributed.assign", "sid_metrics": "forge_ray.distributed.sid_metrics",
         "train_gr": "forge_ray.distributed.train_gr", "evaluate": "forge_ray.distributed.evaluate",
         "sweep": "forge_ray.distributed.sweep", "run_pipeline": "forge_ray.distributed.pipeline",
         "ray_session": "forge_ray.distributed.session"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forge_ray' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Recommendation",
    "Recommender",
    "SidTable",
    "add_items",
    "synth",
    "ingest",
    "embed",
    "train_sid",
    "assign",
    "sid_metrics",
    "train_gr",
    "evaluate",
    "sweep",
    "run_pipeline",
    "ray_session",
    "ConfigError",
    "ForgeRayError",
    "InputError",
    "atomic_dir",
    "load_config",
    "read_manifest",
    "write_manifest",
]
