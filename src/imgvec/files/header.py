"""The header every imgvec file carries in its attributes: schema, checksum and version-1 migration.

Stores, indexes and heads are HDF5 files with the same header in their attributes::

    kind            "store" | "index" | "head"   (also as format="imgvec-<kind>")
    format_version  3   (3: no variable-length strings, text attributes of fixed length; 1 and 2 still read)
    store_id        the store the rows come from (a store's own id)
    generation      the store's generation (bumped when rows are removed)
    rows            rows covered (store: committed rows; index: vectors; head: training rows)
    dim             embedding size
    + provenance    one attribute per Provenance field (backbone, weights, input_size, ...)
    header_sha256   checksum of all of the above

Reading a header checks every value present and of the right type, provenance naming a known
backbone, and the checksum. Version-1 files (imgvec 0.1) are migrated on reading where they hold
everything needed (stores, heads); a version-1 index never recorded its store's generation, so it
is refused with the command that rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from imgvec.backbones.modelfile import MAX_MODEL_BYTES, MODEL_SUFFIXES
from imgvec.backbones.registry import BACKBONES
from imgvec.checks import MAX_IMAGE_SIZE
from imgvec.errors import BadInputError, MismatchError
from imgvec.files.provenance import Provenance
from imgvec.files.strings import text_value
from imgvec.files.structure import REBUILD, check_attributes, damaged, reading

KINDS = ("store", "index", "head")
FORMATS = {kind: f"imgvec-{kind}" for kind in KINDS}
FORMAT_VERSION = 3  # 3: no variable-length string anywhere in the file (imgvec.files.strings)
_WEIGHT_KINDS = ("imagenet", "random", "file", "model")
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


def write_provenance(attrs: Any, provenance: Provenance) -> None:
    """One attribute per provenance field, so plain h5py users can read them (text as fixed-length UTF-8)."""
    for f in fields(Provenance):
        value = getattr(provenance, f.name)
        if value is not None:
            attrs[f.name] = text_value(value) if isinstance(value, str) else value


def write_header(attrs: Any, header: Header) -> None:
    """Write ``header`` and its checksum (so an attribute edited by hand is noticed)."""
    attrs.update({k: text_value(v) if isinstance(v, str) else v for k, v in header.attrs().items()})
    write_provenance(attrs, header.provenance)
    attrs["header_sha256"] = text_value(header_digest(attrs))


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


def _plain(value: Any) -> Any:
    """An attribute's value as plain Python: text (a fixed-length byte string since format 3) as str."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
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
    """The provenance attributes, checked against the backbone registry (a model file's, against its own record)."""
    data: dict[str, Any] = {}
    for f in fields(Provenance):
        if f.name in attrs:
            data[f.name] = _plain(attrs[f.name])
    for name in ("backbone", "weights", "preprocessing"):
        get_attr(data, name, str, path, kind)
    size = get_attr(data, "input_size", int, path, kind, minimum=1)
    get_attr(data, "dim", int, path, kind, minimum=1)
    if data["weights"] == "model":
        _check_model_file_record(data, path, kind)
    else:
        backbone = BACKBONES.get(data["backbone"])
        if backbone is None:
            raise damaged(path, kind, f"unknown backbone {data['backbone']!r}")
        if size < backbone.min_size:
            raise damaged(path, kind, f"input_size {size} is below {backbone.name}'s minimum {backbone.min_size}")
        if any(data.get(name) is not None for name in _MODEL_FIELDS):
            raise damaged(path, kind, f"model-file attributes on a {data['backbone']} provenance")
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


_MODEL_FIELDS = {"model_format": str, "model_path": str, "model_size": int, "model_sha256": str, "model_preprocess": str,
                 "model_layer": str, "model_input": str, "model_output": str}


def _check_model_file_record(data: dict[str, Any], path: Any, kind: str) -> None:
    """A model file's provenance: every model_* field present and typed, the sha256 64 hex digits, the size sane.
    The backbone is the file's name, not a registry entry."""
    for name, typ in _MODEL_FIELDS.items():
        get_attr(data, name, typ, path, kind)
    digest = data["model_sha256"]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise damaged(path, kind, f"model_sha256 {digest[:80]!r} is not a sha256")
    if data["model_format"] not in MODEL_SUFFIXES.values():
        raise damaged(path, kind, f"model_format {data['model_format'][:40]!r}")
    if not 0 < data["model_size"] <= 2 * MAX_MODEL_BYTES:
        raise damaged(path, kind, f"model_size {data['model_size']}")
    if data["input_size"] > MAX_IMAGE_SIZE:
        raise damaged(path, kind, f"input_size {data['input_size']} is above {MAX_IMAGE_SIZE}")


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
                    get_attr(attrs, "rows", int, path, kind, minimum=0), get_attr(attrs, "dim", int, path, kind, minimum=1),
                    version)
    if header.dim != provenance.dim:
        raise damaged(path, kind, f"dim {header.dim} disagrees with the provenance's {provenance.dim}")
    if not header.store_id and kind != "head":  # a head fitted on arrays in a notebook has no store
        raise damaged(path, kind, "empty store_id")
    if text_attr(attrs, "header_sha256") != header_digest(attrs):
        raise damaged(path, kind, "its header does not match its checksum: damaged or edited")
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


def other_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes beyond the header and its checksum, as plain Python values."""
    names = _header_names() | {"header_sha256"}
    return {k: _plain(v) for k, v in attrs.items() if k not in names}
