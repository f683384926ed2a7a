"""Streaming access to ``.npz`` files: read row ranges, write row blocks, safe unpickling.

FORGE's files are 14 GB npz archives, so nothing here ``np.load``s a whole member.
:func:`members` reads only each member's ``.npy`` header (shape, dtype, where the
data starts) and :func:`read_rows` reads rows ``[start, stop)``:

- **stored** (uncompressed, ``np.savez``) members: one ``seek`` + one ``read`` of exactly
  the requested rows. Cost O(rows read), any chunk in any order.
- **deflated** (``np.savez_compressed``) members: deflate streams cannot be entered in
  the middle, so a read at row ``r`` decompresses (and discards) rows ``[0, r)`` first.
  A member split into k chunks therefore costs about k/2 full decompressions in total.
  Memory stays O(rows read) either way; :func:`iter_rows` reads a member once,
  sequentially, in blocks when that is the cheaper plan.

The one pickled member FORGE uses (``itemEncID``, a dict item id -> row) is read with
:class:`RestrictedUnpickler`, which only admits the numpy globals that ``np.save``
needs to rebuild a 0-d object array; anything else (``os.system``, ``eval``, ...) is
refused before it is called.

Hostile sizes are refused before anything is allocated (one-line InputError naming
the file and member): a member's declared array bytes (shape x itemsize) must fit in
what the zip member can hold - its stored size, or for deflated members the zip
header's uncompressed size and at most :data:`MAX_DEFLATE_RATIO` times the
compressed size; a member may not declare more rows than it has bytes (zero-width
rows would otherwise let a 1 KB file plan 10^12 rows); and every length a pickle
declares (bytes, strings, big ints, frames) must fit in the bytes left in its stream,
and an array it rebuilds must hold exactly the elements it supplies.

:class:`NpzWriter` writes npz archives member by member (ZIP64, stored), streaming
row blocks so that millions of rows never sit in memory at once.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from numpy.lib import format as npformat

from forge_ray.data.resources import human, require_memory
from forge_ray.errors import InputError

_READ_BLOCK = 16 << 20  # bytes decompressed and discarded per step when skipping
# Unpickled objects per pickle byte: a dict of int -> int pickles to ~15 B per entry
# and costs ~100 B of Python objects (+ the payload itself while it is read).
PICKLE_EXPANSION = 10
# Deflate cannot expand its input more than ~1032x (a 258-byte match per ~2 bits), so
# a deflated member claiming more is lying about its size.
MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class NpyInfo:
    """Where one ``.npy`` member of an npz lives and what it holds.

    ``header_len`` is the offset of the array data within the (decompressed) member;
    ``data_offset`` its absolute file offset (meaningful for stored members only).
    """

    name: str             # member name without ".npy"
    zip_name: str         # name inside the zip
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    compressed: bool
    header_len: int
    data_offset: int
    member_size: int = 0  # uncompressed bytes of the member (zip directory), header included

    @property
    def row_bytes(self) -> int:
        """Bytes per leading-axis row (a 0-d array counts as one row)."""
        return int(self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)))


def members(path: str | os.PathLike) -> dict[str, NpyInfo]:
    """Read every ``.npy`` member header of an npz (no array data is read).

    Raises InputError naming ``path`` for a missing, corrupt or truncated archive, an
    unreadable header, or a member whose stored size is smaller than its shape says.
    """
    path = os.fspath(path)
    out: dict[str, NpyInfo] = {}
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for zi in zf.infolist():
                if not zi.filename.endswith(".npy"):
                    continue
                out[zi.filename[:-4]] = _member_info(path, zf, raw, zi, size)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise InputError(path, f"not a readable npz (corrupt or truncated zip: {e})") from None
    return out


def _member_info(path: str, zf: zipfile.ZipFile, raw, zi: zipfile.ZipInfo,
                 file_size: int) -> NpyInfo:
    name = zi.filename[:-4]
    if zi.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InputError(path, f"member {name!r} uses zip compression method {zi.compress_type}; "
                               "only stored or deflated members (np.savez, np.savez_compressed) are read")
    compressed = zi.compress_type != zipfile.ZIP_STORED
    try:
        with zf.open(zi) as f:
            version = npformat.read_magic(f)
            reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, fortran, dtype = reader(f, max_header_size=1 << 20)
            header_len = f.tell()
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(path, f"member {name!r} has no valid .npy header ({e})") from None
    # Python ints: a hostile shape must not overflow int64 into a small number
    n_items = math.prod(int(s) for s in shape)
    need = header_len + (0 if dtype.hasobject else n_items * dtype.itemsize)
    if zi.file_size < need:
        raise InputError(path, f"member {name!r} is truncated: {zi.file_size} bytes, "
                               f"its header promises {need}")
    if compressed and need > zi.compress_size * MAX_DEFLATE_RATIO + 1024:
        raise InputError(path, f"member {name!r} declares {need} bytes but holds {zi.compress_size} "
                               f"compressed bytes (more than deflate's {MAX_DEFLATE_RATIO}x can expand to)")
    rows = int(shape[0]) if shape else 1
    # rows of no data bytes (zero width, or pickled objects) escape the checks above,
    # yet a planner allocates per row; each costs at least a byte in any real file
    if (dtype.hasobject or need == header_len) and rows > max(1, zi.compress_size):
        raise InputError(path, f"member {name!r} declares {rows} rows of shape {tuple(shape[1:])} "
                               f"in {zi.compress_size} bytes (a hostile or broken header)")
    offset = header_len
    if not compressed:
        # The local file header (30 bytes + name + extra) precedes the member data;
        # its extra field can differ from the central directory's, so read it.
        raw.seek(zi.header_offset)
        local = raw.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise InputError(path, f"member {name!r}: bad local zip header (corrupt file)")
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        offset = zi.header_offset + 30 + n_name + n_extra + header_len
        if offset + (need - header_len) > file_size:
            raise InputError(path, f"member {name!r} runs past the end of the file (truncated)")
    return NpyInfo(name, zi.filename, tuple(int(s) for s in shape), dtype, bool(fortran),
                   compressed, header_len, offset, zi.file_size)


def read_rows(path: str | os.PathLike, info: NpyInfo, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a member as an array of shape ``(stop-start, *shape[1:])``.

    Memory: the rows read. Stored members: one seek + read. Deflated members:
    decompresses ``[0, start)`` in 16 MiB steps and discards it (see module doc).
    """
    path = os.fspath(path)
    if info.dtype.hasobject:
        raise InputError(path, f"member {info.name!r} holds Python objects, not rows")
    if len(info.shape) > 1 and info.fortran_order:
        raise InputError(path, f"member {info.name!r} is Fortran-ordered; rows cannot be streamed")
    n_rows = info.shape[0] if info.shape else 1
    if not 0 <= start <= stop <= n_rows:
        raise ValueError(f"rows [{start}, {stop}) outside member {info.name!r} of {n_rows} rows")
    want = (stop - start) * info.row_bytes
    try:
        if not info.compressed:
            with open(path, "rb") as f:
                f.seek(info.data_offset + start * info.row_bytes)
                buf = f.read(want)
        else:
            with zipfile.ZipFile(path) as zf, zf.open(info.zip_name) as f:
                _skip(f, info.header_len + start * info.row_bytes)
                buf = f.read(want)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise InputError(path, f"member {info.name!r}: cannot read rows ({e})") from None
    if len(buf) != want:
        raise InputError(path, f"member {info.name!r} is truncated at rows [{start}, {stop})")
    return np.frombuffer(buf, dtype=info.dtype).reshape((stop - start, *info.shape[1:]))


def iter_rows(path: str | os.PathLike, info: NpyInfo, block_rows: int,
              start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, rows)`` blocks over ``[start, stop)`` in one sequential pass.

    For deflated members this decompresses the member once in total (the cheap plan
    for reading a whole compressed member); memory O(block_rows) rows.
    """
    stop = (info.shape[0] if info.shape else 1) if stop is None else stop
    if not info.compressed:
        for s in range(start, stop, block_rows):
            yield s, read_rows(path, info, s, min(stop, s + block_rows))
        return
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(info.zip_name) as f:
            _skip(f, info.header_len + start * info.row_bytes)
            for s in range(start, stop, block_rows):
                e = min(stop, s + block_rows)
                want = (e - s) * info.row_bytes
                buf = f.read(want)
                if len(buf) != want:
                    raise InputError(path, f"member {info.name!r} is truncated at row {s}")
                yield s, np.frombuffer(buf, dtype=info.dtype).reshape((e - s, *info.shape[1:]))
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise InputError(path, f"member {info.name!r}: cannot read rows ({e})") from None


def _skip(f, n: int) -> None:
    while n > 0:
        got = len(f.read(min(n, _READ_BLOCK)))
        if got == 0:
            raise EOFError("member ends early")
        n -= got


# --------------------------------------------------------------------------- pickles

class _CheckedArray(np.ndarray):
    """What an unpickled ``ndarray`` is rebuilt as: its ``__setstate__`` refuses a
    declared shape that the supplied data does not fill before numpy allocates it (an
    object array of 10^12 elements from a one-element list would be 8 TB)."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, data = state[-4], state[-3], state[-1]
        try:
            n = math.prod(int(s) for s in shape)
        except TypeError:
            raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}") from None
        dtype = np.dtype(dtype)
        have, want = (len(data), n) if dtype.hasobject else (len(data), n * dtype.itemsize)
        if have != want:
            raise pickle.UnpicklingError(f"array of shape {tuple(shape)} declared with "
                                         f"{have} {'elements' if dtype.hasobject else 'bytes'} of data")
        super().__setstate__(state)


def _safe_reconstruct(subtype, shape, dtype):
    from numpy._core.multiarray import _reconstruct

    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays may be rebuilt")
    # numpy pickles the (0,) placeholder that __setstate__ then fills
    if tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"unexpected array placeholder shape {shape!r}")
    return _reconstruct(_CheckedArray, shape, dtype)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from numpy._core.multiarray import scalar

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                           ("numpy", "dtype"): np.dtype}
    # numpy >= 2 pickles under numpy._core, older files under numpy.core.
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[(mod, "_reconstruct")] = _safe_reconstruct
        allowed[(mod, "scalar")] = scalar
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, strings and numpy arrays/scalars.

    ``find_class`` is the only way a pickle can reach a callable; it returns the
    numpy functions ``np.save`` uses for a 0-d object array and refuses every other
    global, so a malicious ``__reduce__`` (``os.system``, ``builtins.eval``, ...) is
    rejected before anything runs. Sizes are bounded by :func:`check_pickle_sizes`
    (run it on the payload first) and by the rebuilt arrays' own checks.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def check_pickle_sizes(payload: bytes) -> None:
    """Refuse a pickle any of whose declared lengths exceeds the bytes left in it.

    The C unpickler allocates a ``BINBYTES8``/``BINUNICODE8``/``FRAME``/``LONG4``...
    object of the declared length *before* reading it, so a few bytes declaring
    10^12 would be a MemoryError (or an OOM kill). ``pickletools.genops`` walks the
    opcodes without building anything and reads each argument from an in-memory
    stream, which fails (ValueError) when fewer bytes remain than declared. Cost
    ~1.3 s per million dict entries; memory O(1) beyond ``payload``.
    """
    try:
        for _ in pickletools.genops(io.BytesIO(payload)):
            pass
    except ValueError as e:
        raise pickle.UnpicklingError(f"declared size exceeds the data: {e}") from None


def read_pickled(path: str | os.PathLike, info: NpyInfo) -> Any:
    """Unpickle an object member (``np.save(..., allow_pickle=True)``) safely.

    Returns the 0-d array's object (``.item()``) or the array itself. Refused up front
    when ~``1 + PICKLE_EXPANSION`` times the payload exceeds the available memory;
    otherwise the whole payload is read (never more than the zip directory's size),
    size-checked by :func:`check_pickle_sizes`, then unpickled: a pickled dict of N
    ints costs ~100 B per entry.
    """
    path = os.fspath(path)
    if not info.dtype.hasobject:
        raise InputError(path, f"member {info.name!r} is not a pickled object array")
    payload_size = max(0, info.member_size - info.header_len)
    require_memory(payload_size * (1 + PICKLE_EXPANSION), path,
                   f"unpickling member {info.name!r} ({human(payload_size)} of pickle)",
                   "it holds more Python objects than this machine can build")
    try:
        with zipfile.ZipFile(path) as zf, zf.open(info.zip_name) as f:
            _skip(f, info.header_len)
            payload = f.read()
        check_pickle_sizes(payload)
        obj = RestrictedUnpickler(io.BytesIO(payload)).load()
        del payload
    except pickle.UnpicklingError as e:
        raise InputError(path, f"member {info.name!r}: unsafe or invalid pickle ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, zlib.error) as e:
        raise InputError(path, f"member {info.name!r}: corrupt pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray):
        obj = obj.view(np.ndarray)  # a plain array, not the checking subclass
        return obj.item() if obj.shape == () else obj
    return obj


# --------------------------------------------------------------------------- writing

class NpyRowWriter:
    """Streams the rows of one ``.npy`` member; the full shape is declared up front."""

    def __init__(self, handle, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self._f, self.name, self.dtype, self.shape = handle, name, np.dtype(dtype), shape
        self.rows = 0
        header = {"descr": npformat.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": tuple(shape)}
        try:
            npformat.write_array_header_1_0(self._f, header)
        except ValueError:  # header too long for format 1.0 (raised before writing)
            npformat.write_array_header_2_0(self._f, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.name}: rows of shape {rows.shape[1:]}, expected {self.shape[1:]}")
        if self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.name}: more than the declared {self.shape[0]} rows")
        self._f.write(memoryview(rows).cast("B"))
        self.rows += len(rows)


class NpzWriter:
    """Writes an npz archive member by member (stored, ZIP64), readable by ``np.load``.

    Use :meth:`stream` for big arrays (rows written in blocks; memory = one block),
    :meth:`add_array` for small ones and :meth:`add_pickled` for object members such
    as FORGE's ``itemEncID`` dict (which ``np.save`` pickles whole: ~100 B/entry).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._zf = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def stream(self, name: str, dtype, shape: tuple[int, ...]) -> "_StreamCtx":
        return _StreamCtx(self._zf, name, np.dtype(dtype), tuple(int(s) for s in shape))

    def add_array(self, name: str, arr: np.ndarray) -> None:
        with self.stream(name, arr.dtype, arr.shape) as w:
            w.write(arr.reshape(arr.shape))

    def add_pickled(self, name: str, obj: Any) -> None:
        holder = np.empty((), dtype=object)
        holder[()] = obj
        with self._zf.open(_entry(name), "w", force_zip64=True) as f:
            npformat.write_array(f, holder, allow_pickle=True)

    def close(self) -> None:
        self._zf.close()

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _entry(name: str) -> zipfile.ZipInfo:
    """A member entry with a fixed timestamp, so equal contents give equal files."""
    return zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))


class _StreamCtx:
    def __init__(self, zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self._zf, self._name, self._dtype, self._shape = zf, name, dtype, shape

    def __enter__(self) -> NpyRowWriter:
        self._handle = self._zf.open(_entry(self._name), "w", force_zip64=True)
        self._writer = NpyRowWriter(self._handle, self._name, self._dtype, self._shape)
        return self._writer

    def __exit__(self, exc_type, *_) -> None:
        self._handle.close()
        n = self._shape[0] if self._shape else 1
        if exc_type is None and self._shape and self._writer.rows != n:
            raise ValueError(f"{self._name}: wrote {self._writer.rows} rows, declared {n}")
