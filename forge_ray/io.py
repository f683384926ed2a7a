"""Atomic output folders and stage manifests.

Every stage writes into a hidden temporary sibling of its output folder and renames
it into place only when complete, so a failed or killed run never leaves a
half-written output behind. Each output carries ``manifest.json`` describing its
inputs, config, counts and the code version, which the next stage reads instead of
users copying paths by hand.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from forge_ray.errors import InputError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds.

    The temporary folder is a sibling of ``out`` (same filesystem, so the final
    ``os.replace`` is atomic). On any exception it is deleted and ``out`` is left as
    it was. An existing ``out`` is refused unless ``overwrite`` is set, in which case
    it is replaced only after the new output is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(out, "output already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from forge_ray import __version__

    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{__version__}+g{ref[:10]}"
    except OSError:
        return __version__


def write_manifest(folder: str | os.PathLike, kind: str, **fields: Any) -> dict:
    """Write ``folder/manifest.json`` with ``kind``, time, code version and ``fields``."""
    manifest = {
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        **fields,
    }
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return manifest


def read_json_in(folder: str | os.PathLike, name: str, missing: str, what: str) -> Any:
    """Parse ``folder/name``: InputError on the folder when absent (``missing`` says
    why that matters) and on the file when it is not JSON (``what`` names its role)."""
    path = Path(folder) / name
    if not path.is_file():
        raise InputError(folder, f"no {name} ({missing})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"corrupt {what}: {e}") from None


def read_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """Read ``folder/manifest.json``; check its ``kind`` when given."""
    manifest = read_json_in(folder, MANIFEST, "not a complete forge_ray output", "manifest")
    if kind is not None and manifest.get("kind") != kind:
        raise InputError(folder, f"expected a {kind!r} output, found {manifest.get('kind')!r}")
    return manifest


def _jsonable(obj: Any) -> Any:
    """JSON fallback for numpy scalars/arrays, paths and dataclasses."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
