"""forge_ray: semantic IDs and generative retrieval, FORGE-style, on Ray.

The public surface is listed in ``__all__``; everything else is internal.
Algorithms live in :mod:`forge_ray.core` (no Ray imports); Ray and DeepSpeed are
used only in :mod:`forge_ray.distributed`.
"""

__version__ = "0.1.0"

from forge_ray.config import load_config
from forge_ray.errors import ConfigError, ForgeRayError, InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest

__all__ = [
    "__version__",
    "ConfigError",
    "ForgeRayError",
    "InputError",
    "atomic_dir",
    "load_config",
    "read_manifest",
    "write_manifest",
]
