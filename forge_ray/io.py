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
from typing import Any, Iterable, Iterator

from forge_ray.errors import InputError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, *, kind: str | None = None,
               inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds.

    The temporary folder is a sibling of ``out`` (same filesystem, so the final
    ``os.replace`` is atomic). On any exception it is deleted and ``out`` is left as
    it was. ``out`` is first checked with :func:`check_output` (``overwrite``,
    ``kind``, ``inputs``); an existing ``out`` is replaced only after the new output is
    complete.
    """
    out = check_output(out, overwrite, kind=kind, inputs=inputs)
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


def check_output(out: str | os.PathLike, overwrite: bool, *, kind: str | None,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output folder that must not be written; returns ``out`` as a Path.

    Refused (one-line InputError naming ``out``, nothing touched): an ``out`` that is,
    contains or lies inside one of ``inputs`` (compared after resolving symlinks, so
    ``--out`` can never replace what the command reads); an existing ``out`` without
    ``overwrite``; and, with ``overwrite``, an existing ``out`` that is not a previous
    output of the same stage, i.e. whose ``manifest.json`` does not say ``kind``
    (``kind=None`` replaces nothing). Stages that run long before they write call
    this up front too, so a bad ``--out`` fails in seconds, not after training.
    """
    out = Path(out)
    resolved = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            what = "is" if resolved == src else "is inside" if src in resolved.parents else "contains"
            raise InputError(out, f"output {what} the input {os.fspath(inp)}; choose another "
                                  "output folder")
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise InputError(out, "output already exists (pass --overwrite to replace it)")
    found = manifest_kind(out)
    if kind is None or found != kind:
        said = "has no readable manifest.json" if found is None else f"holds a {found!r} output"
        raise InputError(out, f"--overwrite replaces only a previous {kind or 'forge_ray'!r} output, "
                              f"and this folder {said}; left untouched (choose another output "
                              "folder or remove it yourself)")
    return out


def manifest_kind(folder: str | os.PathLike) -> str | None:
    """The ``kind`` in ``folder/manifest.json``; None for a file, a symlink, or a folder
    without a readable manifest (a user's folder, which must never be replaced)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        kind = json.loads((folder / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


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


# Manifest fields that name other folders or files (inputs, run folders). On disk one that
# lies under the manifest folder's parent (a sibling stage output of one run folder) is
# stored relative to the manifest's folder ("../ingest"), so a run folder moved whole keeps
# its links; read_manifest gives every one back absolute (manifest_path).
PATH_FIELDS = ("data", "dataset", "datasets", "sids", "model", "parent", "embedded_from",
               "run_dir", "tensorboard")


def write_manifest(folder: str | os.PathLike, kind: str, **fields: Any) -> dict:
    """Write ``folder/manifest.json`` with ``kind``, time, code version and ``fields``;
    returns the manifest as given (paths absolute). ``folder`` may be the atomic
    temporary sibling of the final folder: both have the same parent."""
    manifest = {
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        **fields,
    }
    stored = {k: _relative(folder, v) if k in PATH_FIELDS else v for k, v in manifest.items()}
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(stored, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return manifest


def _relative(folder: str | os.PathLike, value: Any) -> Any:
    """``value`` (a path or a list of paths) relative to ``folder`` where it lies under
    ``folder``'s parent; anything else as it is."""
    if isinstance(value, list):
        return [_relative(folder, v) for v in value]
    if not isinstance(value, (str, os.PathLike)) or not os.path.isabs(value):
        return value
    parent = os.path.dirname(os.path.abspath(folder))
    target = os.path.normpath(value)
    if os.path.commonpath([target, parent]) != parent:
        return os.fspath(value)
    return os.path.relpath(target, os.path.abspath(folder))


def manifest_path(folder: str | os.PathLike, value: str | os.PathLike | None) -> Path | None:
    """A path recorded in ``folder``'s manifest, absolute: a relative one is relative to
    ``folder`` (see :data:`PATH_FIELDS`). None / "" give None. For code that reads a
    manifest's JSON itself; :func:`read_manifest` already applies it to every path field."""
    if value is None or value == "":
        return None
    p = Path(value)
    return p if p.is_absolute() else Path(os.path.normpath(Path(folder).absolute() / p))


def read_json_in(folder: str | os.PathLike, name: str, missing: str, what: str) -> Any:
    """Parse ``folder/name``: InputError on the folder when absent (``missing`` says
    why that matters) and on the file when it is not JSON (``what`` names its role)."""
    path = Path(folder) / name
    if not path.is_file():
        raise InputError(folder, f"no {name} ({missing})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not JSON, or not even text
        raise InputError(path, f"corrupt {what}: {e}") from None


def read_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """Read ``folder/manifest.json``; check its ``kind`` when given. Path fields
    (:data:`PATH_FIELDS`) come back absolute, wherever the folders were moved."""
    manifest = read_json_in(folder, MANIFEST, "not a complete forge_ray output", "manifest")
    if kind is not None and manifest.get("kind") != kind:
        raise InputError(folder, f"expected a {kind!r} output, found {manifest.get('kind')!r}")
    for key in PATH_FIELDS:
        value = manifest.get(key)
        if isinstance(value, list):
            manifest[key] = [os.fspath(manifest_path(folder, v)) if isinstance(v, str) and v else v
                             for v in value]
        elif isinstance(value, str) and value:
            manifest[key] = os.fspath(manifest_path(folder, value))
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
