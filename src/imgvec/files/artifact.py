"""The one layer under every imgvec file: header, validation, opening and atomic writing.

Stores, indexes and heads are HDF5 files with the same header in their attributes::

    kind            "store" | "index" | "head"   (also as format="imgvec-<kind>")
    format_version  2
    store_id        the store the rows come from (a store's own id)
    generation      the store's generation (bumped when rows are removed)
    rows            rows covered (store: committed rows; index: vectors; head: training rows)
    dim             embedding size
    + provenance    one attribute per Provenance field (backbone, weights, input_size, ...)
    header_sha256   checksum of all of the above

Opening a file validates it against itself (every header value present and of the right type,
provenance naming a known backbone, each kind's datasets present with the dtypes
and shapes the header implies); :func:`check_partner` validates it against its store. Anything
wrong is one :class:`~imgvec.errors.BadInputError` (damaged, forged) or
:class:`~imgvec.errors.MismatchError` (made from something else) line naming the file and the fix.

Version-1 files (imgvec 0.1) are migrated on reading where they hold everything needed (stores,
heads); a version-1 index never recorded its store's generation, so it is refused with the
command that rebuilds it.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from imgvec.backbones.registry import BACKBONES
from imgvec.errors import BadInputError, MismatchError
from imgvec.fileio import atomic_path, require_regular
from imgvec.files.provenance import Provenance

KINDS = ("store", "index", "head")
FORMATS = {kind: f"imgvec-{kind}" for kind in KINDS}
FORMAT_VERSION = 2
REBUILD = {
    "store": "embed the images again into a new store (imgvec embed)",
    "index": "rebuild the index from its store (imgvec index STORE)",
    "head": "train the head again (imgvec train STORE -o HEAD)",
}
_WEIGHT_KINDS = ("imagenet", "random", "file")
_HEADER_ATTRS = ("kind", "format", "format_version", "store_id", "generation", "rows", "dim")


@dataclass(frozen=True)
class Header:
    """What every imgvec file says about itself."""

    kind: str
    provenance: Provenance
    store_id: str
    generation: int
    rows: int
    dim: int
    format_version: int = FORMAT_VERSION

    def attrs(self) -> dict[str, Any]:
        values = (self.kind, FORMATS[self.kind], self.format_version, self.store_id, self.generation, self.rows,
                  self.dim)
        return dict(zip(_HEADER_ATTRS, values))


# -- strings in HDF5 ----------------------------------------------------------------------
def str_dtype() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def encode_keys(keys: Iterable[str]) -> list[bytes]:
    # surrogateescape keeps non-UTF-8 file names round-tripping instead of failing the batch.
    return [str(k).encode("utf-8", "surrogateescape") for k in keys]


def decode_keys(dataset: Any, stop: int, path: Any = None, kind: str = "store") -> list[str]:
    """The first ``stop`` strings of ``dataset``, once their lengths are known to fit in the file."""
    if stop == 0:
        return []
    path = dataset.file.filename if path is None else path
    with reading(path, kind):
        size, need = file_size(dataset.file), string_bytes(dataset, stop, path, kind)
        if need > size:
            raise damaged(path, kind, f"{dataset.name!r}: {stop:,} strings claim {need:,} bytes, more than the "
                                      f"file's {size:,}")
        return list(dataset.asstr(errors="surrogateescape")[:stop])


# -- writing --------------------------------------------------------------------------------
def write_provenance(attrs: Any, provenance: Provenance) -> None:
    """One attribute per provenance field, so plain h5py users can read them."""
    for f in fields(Provenance):
        value = getattr(provenance, f.name)
        if value is not None:
            attrs[f.name] = value


def write_header(attrs: Any, header: Header) -> None:
    """Write ``header`` and its checksum (so an attribute edited by hand is noticed)."""
    attrs.update(header.attrs())
    write_provenance(attrs, header.provenance)
    attrs["header_sha256"] = header_digest(attrs)


def _header_names() -> set[str]:
    """Every attribute the header writes: its own fields and one per provenance field."""
    return set(_HEADER_ATTRS) | {f.name for f in fields(Provenance)}


def header_digest(attrs: Mapping[str, Any]) -> str:
    """sha256 over the header and provenance attributes present in ``attrs``."""
    import hashlib
    import json

    names = sorted(_header_names())
    present = {name: _plain(attrs[name]) for name in names if name in attrs}
    text = json.dumps(present, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def create(path: str | os.PathLike[str], header: Header) -> Iterator[Any]:
    """A new HDF5 file at ``path`` with ``header``, written atomically (see :func:`fileio.atomic_path`)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            write_header(h5.attrs, header)
            yield h5


# -- reading and validating -----------------------------------------------------------------
def damaged(path: str | os.PathLike[str], kind: str | None, what: str) -> BadInputError:
    """One line naming the file, what is wrong with it and how to make it again (``kind`` None: not known yet)."""
    if kind is None:
        return BadInputError(f"{path}: damaged imgvec file ({what})")
    return BadInputError(f"{path}: damaged imgvec {kind} file ({what}); {REBUILD[kind]}")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _shown(value: Any) -> str:
    """A value for a message: plain Python, never a numpy repr."""
    value = value.tolist() if hasattr(value, "tolist") else value
    return repr(value)


def get_attr(attrs: Mapping[str, Any], name: str, typ: type | tuple[type, ...], path: Any, kind: str,
         default: Any = ..., minimum: int | None = None) -> Any:
    """Attribute ``name`` as ``typ``; a missing or ill-typed one is a damaged file."""
    if name not in attrs:
        if default is not ...:
            return default
        raise damaged(path, kind, f"no {name!r} attribute")
    value = _plain(attrs[name])
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, typ):
        raise damaged(path, kind, f"attribute {name!r} is {_shown(value)}, not {getattr(typ, '__name__', typ)}")
    if minimum is not None and value < minimum:
        raise damaged(path, kind, f"attribute {name!r} is {value}, below {minimum}")
    return value


def read_provenance(attrs: Mapping[str, Any], path: Any = "", kind: str = "store") -> Provenance:
    """The provenance attributes, checked against the backbone registry."""
    data: dict[str, Any] = {}
    for f in fields(Provenance):
        if f.name in attrs:
            data[f.name] = _plain(attrs[f.name])
    for name in ("backbone", "weights", "preprocessing"):
        get_attr(data, name, str, path, kind)
    size = get_attr(data, "input_size", int, path, kind, minimum=1)
    get_attr(data, "dim", int, path, kind, minimum=1)
    backbone = BACKBONES.get(data["backbone"])
    if backbone is None:
        raise damaged(path, kind, f"unknown backbone {data['backbone']!r}")
    if size < backbone.min_size:
        raise damaged(path, kind, f"input_size {size} is below {backbone.name}'s minimum {backbone.min_size}")
    if data["weights"] not in _WEIGHT_KINDS:
        raise damaged(path, kind, f"weights {data['weights']!r} is not one of {', '.join(_WEIGHT_KINDS)}")
    if data["weights"] == "random":
        get_attr(data, "weights_seed", int, path, kind)
    if data["weights"] == "file":
        get_attr(data, "weights_sha256", str, path, kind)
    for name in ("weights_seed", "weights_path", "weights_sha256"):
        data.setdefault(name, None)
    for f in fields(Provenance):  # recorded-only fields: a wrong type is still damage
        if f.name in data and data[f.name] is not None and f.type in ("str", "int") and not isinstance(
                data[f.name], str if f.type == "str" else int):
            raise damaged(path, kind, f"attribute {f.name!r} is {_shown(data[f.name])}")
    provenance = Provenance(**data)
    if provenance.precision == "int8":  # the model is rebuilt from these: they must say how
        if not provenance.calibration_sha256:
            raise damaged(path, kind, "precision int8 without a calibration_sha256")
        try:
            provenance.calibration()
        except MismatchError as error:
            raise damaged(path, kind, str(error).split(":")[0]) from None
    return provenance


def text_attr(attrs: Mapping[str, Any], name: str) -> str | None:
    """Attribute ``name`` if it is a string, else None (missing, or retyped to something else)."""
    value = _plain(attrs.get(name))
    return value if isinstance(value, str) else None


def read_header(attrs: Mapping[str, Any], path: Any, kind: str) -> Header:
    """Validate and return the header of a file that should be of ``kind``."""
    if hasattr(attrs, "get_id"):  # an HDF5 file's attributes: each is checked before it is read
        check_attributes(attrs, path, kind)
    with reading(path, kind):
        return _read_header(attrs, path, kind)


def _read_header(attrs: Mapping[str, Any], path: Any, kind: str) -> Header:
    fmt = text_attr(attrs, "format")
    if fmt != FORMATS[kind]:
        other = next((k for k, f in FORMATS.items() if f == fmt), None)
        if other:
            raise BadInputError(f"{path}: is an imgvec {other} file, not a {kind}")
        raise BadInputError(f"{path}: not an imgvec {kind} file (no format={FORMATS[kind]!r} attribute)")
    version = get_attr(attrs, "format_version", int, path, kind, default=1)
    if version > FORMAT_VERSION:
        raise BadInputError(f"{path}: written by a newer imgvec (format {version}, this one reads up to "
                            f"{FORMAT_VERSION}); upgrade imgvec")
    if version < 1:
        raise damaged(path, kind, f"format_version {version}")
    provenance = read_provenance(attrs, path, kind)
    if version == 1:
        return _migrate_v1(attrs, path, kind, provenance)
    if get_attr(attrs, "kind", str, path, kind) != kind:
        raise damaged(path, kind, f"kind attribute {_shown(_plain(attrs['kind']))} disagrees with format {fmt!r}")
    header = Header(kind, provenance, get_attr(attrs, "store_id", str, path, kind),
                    get_attr(attrs, "generation", int, path, kind, minimum=0),
                    get_attr(attrs, "rows", int, path, kind, minimum=0), get_attr(attrs, "dim", int, path, kind, minimum=1))
    if header.dim != provenance.dim:
        raise damaged(path, kind, f"dim {header.dim} disagrees with the provenance's {provenance.dim}")
    if not header.store_id and kind != "head":  # a head fitted on arrays in a notebook has no store
        raise damaged(path, kind, "empty store_id")
    if text_attr(attrs, "header_sha256") != header_digest(attrs):
        raise damaged(path, kind, "its header does not match its checksum: edited by hand, or forged")
    return header


def _migrate_v1(attrs: Mapping[str, Any], path: Any, kind: str, provenance: Provenance) -> Header:
    """Read an imgvec 0.1 file as a version-2 header, or refuse it with how to rebuild it."""
    if kind == "index":
        raise BadInputError(f"{path}: an index from imgvec 0.1 (format 1) does not record which version of its "
                            f"store it covers; {REBUILD['index']}")
    rows = get_attr(attrs, "rows", int, path, kind, minimum=0) if kind == "store" else get_attr(
        attrs, "n_train_", int, path, kind, default=0, minimum=0)
    return Header(kind, provenance, get_attr(attrs, "store_id", str, path, kind, default=""),
                  get_attr(attrs, "generation", int, path, kind, default=0, minimum=0), rows, provenance.dim, 1)


# -- structure: checked before any read or write ------------------------------------------
# Everything below holds for every file imgvec writes, so anything else is forged or damaged:
# HDF5 follows soft and external links, external storage and virtual datasets into other files,
# runs filters (a small gzip chunk can inflate to gigabytes) and hands out whatever sizes a file
# claims. Each dataset is checked from its metadata alone before a byte of it is read.
MAX_CHUNK_BYTES = 64 << 20  # imgvec writes chunks of at most 4 MiB (store rows) and 1 MiB (FAISS bytes)
MAX_ATTR_VALUES = 64  # every header attribute is a scalar
_LAYOUTS = {0: "compact", 1: "contiguous", 2: "chunked", 3: "virtual"}


@dataclass(frozen=True)
class Expect:
    """One dataset an imgvec file must hold: its rank, type and the sizes its header implies.

    ``shape`` gives each dimension's exact size (None: any); ``min_rows`` a lower bound on the
    first one (version-1 stores could hold a cut-off batch past their rows).
    """

    ndim: int
    dtype: str  # 'float32', 'uint8', 'uint64', 'str'
    shape: tuple[int | None, ...] | None = None
    min_rows: int | None = None
    optional: bool = False


def check_structure(h5: Any, path: Any, kind: str, expected: Mapping[str, Expect]) -> dict[str, Any]:
    """The datasets ``expected`` names, each checked before anything of it is read.

    Every object on the way is a hard link in this file (never a soft or external link), each
    dataset is stored in this file as imgvec stores it (contiguous or chunked, no external
    storage, no virtual dataset, no filters, chunks of at most :data:`MAX_CHUNK_BYTES`), has
    the rank, type and sizes the header implies, and the bytes it claims are present in the
    file (all of them together fit in it). Anything else is one :func:`damaged` line. Absent
    optional datasets are left out.
    """
    with reading(path, kind):
        size, addr = file_size(h5), h5.id.get_create_plist().get_sizes()[0]
        found, claimed = {}, 0
        for name, spec in expected.items():
            checked = _checked(h5, name, path, kind, spec, size, addr)
            if checked is not None:
                found[name] = checked[0]
                claimed += checked[1]
        if claimed > size:
            raise damaged(path, kind, f"{', '.join(found)} together claim {claimed:,} bytes, more than the "
                                      f"file's {size:,}")
        return found


def dataset(h5: Any, name: str, path: Any, kind: str, ndim: int, dtype: str,
            length: int | None = None, min_length: int | None = None, width: int | None = None) -> Any:
    """The dataset ``name``, checked like :func:`check_structure` checks each of its datasets."""
    shape = (length, *([None] * (ndim - 1))) if ndim else ()
    if width is not None:
        shape = (shape[0], width, *shape[2:])
    return check_structure(h5, path, kind, {name: Expect(ndim, dtype, shape, min_length)})[name]


def file_size(h5: Any) -> int:
    """The size on disk of the open file ``h5`` (what every size claim inside it is checked against)."""
    return os.fstat(h5.id.get_vfd_handle()).st_size


def _link(group: Any, name: str, path: Any, kind: str, shown: str) -> bool:
    """Whether ``name`` exists in ``group`` as a hard link; soft and external links are damage."""
    import h5py

    key = name.encode("utf-8", "surrogateescape")
    if not group.id.links.exists(key):  # looks at the link alone: never follows it
        return False
    link = group.id.links.get_info(key).type
    if link != h5py.h5l.TYPE_HARD:
        what = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}.get(
            link, "a user-defined link")
        raise damaged(path, kind, f"{shown!r} is {what}, not an object of this file")
    return True


def _checked(h5: Any, name: str, path: Any, kind: str, spec: Expect, size: int, addr: int) -> tuple[Any, int] | None:
    """``(dataset, bytes it claims)`` once checked; None for a missing optional one."""
    import h5py

    group = h5
    parts = name.split("/")
    for i, part in enumerate(parts):
        shown = "/".join(parts[: i + 1])
        if not _link(group, part, path, kind, shown):
            if spec.optional:
                return None
            raise damaged(path, kind, f"no {shown!r} {'dataset' if i == len(parts) - 1 else 'group'}")
        group = group[part]
        if i < len(parts) - 1 and not isinstance(group, h5py.Group):
            raise damaged(path, kind, f"{shown!r} is not a group")
    ds = group
    if not isinstance(ds, h5py.Dataset):
        raise damaged(path, kind, f"{name!r} is not a dataset")
    claimed = _check_storage(ds, name, path, kind, size, addr)
    if ds.ndim != spec.ndim:
        raise damaged(path, kind, f"{name!r} has shape {capped(ds.shape)}, expected {spec.ndim}-D")
    ok = ((h5py.check_string_dtype(ds.dtype) is not None) if spec.dtype == "str"
          else ds.dtype == np.dtype(spec.dtype))
    if not ok:
        raise damaged(path, kind, f"{name!r} holds {capped(ds.dtype)}, expected {spec.dtype}")
    for axis, want in enumerate(spec.shape or ()):
        if want is not None and ds.shape[axis] != want:
            what = "rows" if axis == 0 else "columns"
            raise damaged(path, kind, f"{name!r} has {ds.shape[axis]} {what}, the header says {want}")
    if spec.min_rows is not None and ds.shape[0] < spec.min_rows:
        raise damaged(path, kind, f"{name!r} has {ds.shape[0]} rows, fewer than the header's {spec.min_rows}")
    return ds, claimed


def _check_storage(ds: Any, name: str, path: Any, kind: str, size: int, addr: int) -> int:
    """Refuse a dataset stored anywhere but in this file, filtered, or claiming bytes the file lacks;
    return the bytes it claims."""
    import h5py

    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise damaged(path, kind, f"{name!r} is a virtual dataset (its data would come from other files)")
    if dcpl.get_external_count():
        raise damaged(path, kind, f"{name!r} keeps its data in an external file")
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
        raise damaged(path, kind, f"{name!r} has {_LAYOUTS.get(layout, 'an unknown')} layout, which imgvec never writes")
    if dcpl.get_nfilters():
        raise damaged(path, kind, f"{name!r} is compressed or filtered ({capped(dcpl.get_filter(0)[3])}), "
                                  "which imgvec never writes")
    item = _disk_itemsize(ds, addr)
    if layout == h5py.h5d.CHUNKED:
        chunk = ds.chunks or ()
        if math.prod(chunk) * item > MAX_CHUNK_BYTES:
            raise damaged(path, kind, f"{name!r} has chunks of {math.prod(chunk) * item / 1e6:.0f} MB "
                                      f"(at most {MAX_CHUNK_BYTES >> 20} MiB)")
    # Unfiltered data takes its own size in the file. A contiguous dataset says where its bytes are
    # (O(1)); a chunked one would need its chunk index walked, so it is held to the file's size, which
    # bounds what reading it can allocate just as well (chunks it lacks read as zeros).
    claimed = math.prod(ds.shape) * item
    stored = ds.id.get_storage_size() if layout == h5py.h5d.CONTIGUOUS else claimed
    if claimed > size or stored > size or claimed > stored:
        raise damaged(path, kind, f"{name!r} claims {claimed:,} bytes but the file holds "
                                  f"{min(stored, size):,} ({size:,} in all)")
    return claimed


def _disk_itemsize(ds: Any, addr: int) -> int:
    """Bytes one element takes in the file: a variable-length string is a 4-byte length and a heap id."""
    import h5py

    tid = ds.id.get_type()
    if tid.get_class() == h5py.h5t.STRING and tid.is_variable_str():
        return 8 + addr  # addr: the file's size of offsets (8 unless made otherwise)
    return tid.get_size()


def _sizeof_addr(ds: Any) -> int:
    import h5py

    return h5py.h5i.get_file_id(ds.id).get_create_plist().get_sizes()[0]  # not ds.file: that builds a File


def capped(value: Any, limit: int = 80) -> str:
    """``value`` for a message, cut to ``limit`` characters: a forged file must not make a long error."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_attributes(attrs: Any, path: Any, kind: str | None) -> None:
    """Refuse attributes imgvec never writes (it writes scalars), before any value is read."""
    with reading(path, kind):
        for name in attrs:
            aid = attrs.get_id(name)
            if math.prod(aid.shape or ()) > MAX_ATTR_VALUES:
                raise damaged(path, kind, f"attribute {capped(name, 40)!r} holds {math.prod(aid.shape):,} "
                                          "values; imgvec writes scalars")


@contextlib.contextmanager
def reading(path: Any, kind: str | None) -> Iterator[None]:
    """Whatever HDF5 says while reading a file that passed the checks above is still one damaged-file line."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, MemoryError, OverflowError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise damaged(path, kind, f"HDF5 cannot read it: {capped(reason)}") from None


def string_bytes(ds: Any, stop: int, path: Any, kind: str) -> int:
    """Bytes the first ``stop`` strings of ``ds`` will take once read, from the file's own length fields.

    A variable-length string is a 4-byte length and a reference into a heap; many references may
    point at the same large heap object, so a small file could read as gigabytes of strings. The
    lengths are read raw (without following the references) and summed before any string is, and
    the heap collections they point into are walked (:mod:`imgvec.h5heap`) before HDF5 walks them.
    """
    refs = _string_refs(ds, stop, path, kind)
    if refs is None:
        return stop * ds.id.get_type().get_size()
    _check_heaps(ds, refs["heap"], path, kind)
    return int(refs["length"].sum(dtype=np.uint64))


def check_string_heaps(ds: Any, rows: Iterable[int], path: Any, kind: str) -> None:
    """Walk the heap collections the strings at ``rows`` of ``ds`` point into, before HDF5 reads them."""
    refs = _string_refs(ds, rows, path, kind)
    if refs is not None:
        _check_heaps(ds, refs["heap"], path, kind)


def _string_refs(ds: Any, rows: int | Iterable[int], path: Any, kind: str) -> np.ndarray | None:
    """The raw (length, heap address, index) of the first ``rows`` strings of ``ds``, or of the strings
    at the rows listed, read without following them; None if ``ds`` does not hold variable-length strings."""
    import h5py

    tid = ds.id.get_type()
    if not (tid.get_class() == h5py.h5t.STRING and tid.is_variable_str()):
        return None
    if _sizeof_addr(ds) != 8:
        raise damaged(path, kind, "file addresses are not 8 bytes, as imgvec writes them")
    ref = np.dtype([("length", "<u4"), ("heap", "<u8"), ("index", "<u4")])
    wanted = None if isinstance(rows, int) else np.unique(np.fromiter(rows, np.int64))
    stop = rows if wanted is None else (int(wanted[-1]) + 1 if len(wanted) else 0)
    if stop == 0:
        return np.zeros(0, ref)
    if ds.id.get_create_plist().get_layout() == h5py.h5d.CHUNKED:
        step = ds.chunks[0]
        firsts = range(0, stop, step) if wanted is None else (np.unique(wanted // step) * step).tolist()
        parts = []
        for start in firsts:
            try:
                _, raw = ds.id.read_direct_chunk((start,))
            except (KeyError, OSError, RuntimeError, ValueError):
                raise damaged(path, kind, f"{ds.name!r} misses the chunk at row {start}") from None
            block = np.frombuffer(raw, ref, count=min(step, stop - start, len(raw) // ref.itemsize))
            parts.append(block if wanted is None else block[wanted[(wanted >= start) & (wanted < start + len(block))]
                                                            - start])
        block = np.concatenate(parts)
    else:
        offset = ds.id.get_offset()
        raw = os.pread(ds.file.id.get_vfd_handle(), stop * ref.itemsize, offset) if offset is not None else b""
        block = np.frombuffer(raw, ref, count=len(raw) // ref.itemsize)
        block = block if wanted is None else block[wanted[wanted < len(block)]]
    return block


def _check_heaps(obj: Any, addresses: np.ndarray, path: Any, kind: str) -> None:
    import h5py

    from imgvec.files import h5heap

    fid = h5py.h5i.get_file_id(obj.id)
    fd = fid.get_vfd_handle()
    try:
        h5heap.check_collections(h5heap.reader(fd), np.unique(addresses).tolist(), os.fstat(fd).st_size, set())
    except h5heap.MalformedHeap as error:
        raise damaged(path, kind, str(error)) from None


def check_root_heaps(h5: Any, path: Any, kind: str | None) -> None:
    """Walk the heap collections the root group's string attributes point into, before any is read
    (every attribute seen: HDF5's own count must match the messages found)."""
    import h5py

    from imgvec.files import h5heap

    with reading(path, kind):
        read, size, info = h5heap.reader(h5.id.get_vfd_handle()), file_size(h5), h5py.h5o.get_info(h5.id)
        if h5.id.get_create_plist().get_sizes() != (8, 8):
            raise damaged(path, kind, "file addresses are not 8 bytes, as imgvec writes them")
    try:
        heaps, found = h5heap.attribute_heaps(read, info.addr, size)
        if found != info.num_attrs:
            raise h5heap.MalformedHeap(f"HDF5 counts {info.num_attrs} attributes, the header holds {found}")
        h5heap.check_collections(read, heaps, size, set())
    except h5heap.MalformedHeap as error:
        raise damaged(path, kind, str(error)) from None


def check_finite(values: np.ndarray, path: Any, kind: str, what: str, first_row: int = 0) -> np.ndarray:
    """``values`` unchanged if every number is finite, else a damaged-file error naming the first bad row."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.argwhere(~finite)[0][0]) + first_row
        raise damaged(path, kind, f"{what} has NaN or infinite values (row {bad})")
    return values


def open_file(path: str | os.PathLike[str], what: str, missing: str, mode: str = "r") -> Any:
    """Open an imgvec file (a regular file only: never a FIFO or a device); ``what`` names it in errors."""
    import h5py

    path = require_regular(path, what, missing)
    try:
        h5 = h5py.File(path, mode)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInputError(f"{path}: not an HDF5 file, so not {what} ({capped(reason)})") from None
    try:
        # h5.attrs and every name open the root group anew, outside any check: one whose object
        # header is damaged (no group message left) must fail here, inside the guard, not there.
        with reading(path, None):
            h5["/"]
        check_root_heaps(h5, path, None)
    except BaseException:
        h5.close()
        raise
    return h5


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], kind: str, missing: str) -> Iterator[tuple[Any, Header]]:
    """``(h5, header)`` of a validated imgvec file of ``kind``, closed afterwards."""
    with open_file(path, f"an imgvec {kind} file", missing) as h5:
        yield h5, read_header(h5.attrs, path, kind)


def peek(path: str | os.PathLike[str]) -> tuple[str, Header, dict[str, Any]]:
    """The kind, header and other attributes of any imgvec file, reading attributes only."""
    with open_file(path, "an imgvec file", "no such file") as h5:
        check_attributes(h5.attrs, path, None)
        with reading(path, None):
            fmt = text_attr(h5.attrs, "format")
        kind = next((k for k, f in FORMATS.items() if f == fmt), None)
        if kind is None:
            raise BadInputError(f"{path}: not an imgvec file (store, index or head)")
        header = read_header(h5.attrs, path, kind)
        names = _header_names() | {"header_sha256"}
        with reading(path, kind):
            extra = {k: _plain(v) for k, v in h5.attrs.items() if k not in names}
    return kind, header, extra


# -- partners ---------------------------------------------------------------------------------
def check_partner(header: Header, store: Header, what: str, store_what: str, fix: str,
                  same_rows: bool = True) -> None:
    """Raise :class:`MismatchError` unless ``header`` (an index's) describes exactly ``store``'s rows."""
    from imgvec.files.provenance import check_compatible

    if header.store_id != store.store_id:
        raise MismatchError(f"{what} was built from another store than {store_what}; {fix}")
    if header.generation != store.generation:
        raise MismatchError(f"{what} predates rows removed from {store_what} (generation {header.generation}, "
                            f"the store is at {store.generation}); {fix}")
    check_compatible(store.provenance, header.provenance, store_what, what, fix)
    if same_rows and header.rows != store.rows:
        raise MismatchError(f"{what} covers {header.rows} rows but {store_what} has {store.rows}; {fix}")


def path_digests(paths: Iterable[str]) -> np.ndarray:
    """8-byte BLAKE2b digests of absolute image paths: what a head remembers of its training images."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(os.fsencode(p), digest_size=8).digest(), "little")
                     for p in paths], dtype=np.uint64)
