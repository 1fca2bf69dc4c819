"""The user's own model file (``--model PATH``): what it is, read once and checked before anything runs it.

A Keras 3 ``.keras`` file, an ONNX file or an OpenVINO IR (``.xml`` with its ``.bin`` beside it) is read
into memory once, within :data:`MAX_MODEL_BYTES`, hashed, and checked here as data: an ONNX file's every
tensor must hold its data itself (one kept in an external file is refused: no path named by a model is
ever opened) and claim no more bytes than the file has; an IR's constants must lie inside its ``.bin``;
a ``.keras`` archive must hold only what Keras writes, unpack to a bounded size and name no Lambda layer
and no object from outside Keras (those would run code). The runtime then hands these very bytes to
OpenVINO (or Keras), so a file changed underneath cannot swap what runs. No Keras, OpenVINO or ONNX
import here: the file layer reads these records too.

What the file does not say, the user states (:class:`ModelFileSpec`): the preprocessing (Keras' modes
``tf``, ``torch``, ``caffe``, ``none``, or an explicit mean and std), the input size where the model
leaves it open, and which output (``layer``) is the embedding.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from imgvec.errors import BadInputError, MismatchError, did_you_mean, param
from imgvec.fileio import open_regular, require_regular

MODEL_SUFFIXES = {".keras": "keras", ".onnx": "onnx", ".xml": "openvino"}
# A protobuf message (ONNX) cannot exceed 2 GiB; nor does imgvec read a larger model file into memory.
MAX_MODEL_BYTES = 2 << 30
MAX_UNPACKED_BYTES = 4 << 30  # what a .keras archive may unpack to (a zip bomb is refused before Keras opens it)
MAX_CONFIG_BYTES = 64 << 20  # a .keras archive's config.json
MAX_NESTING = 64  # ONNX subgraphs inside subgraphs (If/Loop bodies)
_KERAS_MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}

# name -> (mean, std) on pixels scaled to [0, 1], in the model's channel order; BGR for caffe.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESS_MODES: dict[str, tuple[tuple[float, ...], tuple[float, ...], bool]] = {
    "none": ((0.0, 0.0, 0.0), (1 / 255,) * 3, False),  # raw [0, 255] RGB
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),  # x / 127.5 - 1
    "torch": (_IMAGENET_MEAN, _IMAGENET_STD, False),  # x / 255, ImageNet mean/std
    "caffe": ((103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255,) * 3, True),  # BGR, ImageNet mean subtracted
}
_DESCRIBED = {"none": "none: raw [0, 255] RGB", "tf": "tf: scaled to [-1, 1]",
              "torch": "torch: scaled to [0, 1], ImageNet mean/std normalised",
              "caffe": "caffe: RGB->BGR, ImageNet mean subtracted"}


def is_model_path(model: str | None) -> bool:
    """Whether ``--model`` names a model file (it ends in a model suffix) rather than a registry backbone
    (registry names have no dot, so the two cannot be confused)."""
    return model is not None and Path(str(model)).suffix.lower() in MODEL_SUFFIXES


# -- what the user states ---------------------------------------------------------------------
def _numbers(option: str, text: str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    values = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        raise BadInputError(f"{param(option)} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(numbers) == 1:
        numbers = numbers * 3
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
        raise BadInputError(f"{param(option)} {text!r}: expected one or three finite numbers (R,G,B)")
    return numbers  # type: ignore[return-value]


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.6g}" for v in values)


@dataclass(frozen=True)
class Preprocess:
    """How uint8 pixels become the model's input: ``(x / 255 - mean) / std`` per channel, after RGB->BGR if ``bgr``."""

    mode: str  # a key of PREPROCESS_MODES, or "custom"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False

    @property
    def spec(self) -> str:
        """What ``--preprocess`` (or ``--mean``/``--std``) reproduces it, as recorded in provenance."""
        return self.mode if self.mode != "custom" else f"mean={_fmt(self.mean)};std={_fmt(self.std)}"

    def describe(self) -> str:
        """The provenance's ``preprocessing`` text: compared between stores, so exact numbers for a custom one."""
        if self.mode != "custom":
            return _DESCRIBED[self.mode]
        return f"custom: scaled to [0, 1], mean {_fmt(self.mean)}, std {_fmt(self.std)} (RGB)"


def parse_preprocess(mode: str | None, mean: Any = None, std: Any = None) -> Preprocess:
    """``--preprocess`` (a Keras mode, or a recorded ``mean=...;std=...``) or ``--mean``/``--std``: one is required,
    since a model file does not say how its pixels were scaled."""
    if mode and str(mode).startswith("mean=") and mean is None and std is None:  # as provenance records it
        parts = dict(p.split("=", 1) for p in str(mode).split(";") if "=" in p)
        return parse_preprocess(None, parts.get("mean"), parts.get("std"))
    if mean is not None or std is not None:
        if mode:
            raise BadInputError(f"give {param('preprocess')} or {param('mean')}/{param('std')}, not both")
        m = _numbers("mean", mean) if mean is not None else (0.0, 0.0, 0.0)
        s = _numbers("std", std) if std is not None else (1.0, 1.0, 1.0)
        if any(v <= 0 for v in s):
            raise BadInputError(f"{param('std')} {_fmt(s)}: every value must be above 0")
        return Preprocess("custom", m, s)
    if not mode:
        raise BadInputError(f"a model file does not say how its pixels were scaled: pass {param('preprocess')} "
                            f"{'|'.join(PREPROCESS_MODES)} (Keras' modes) or {param('mean')}/{param('std')} "
                            "(on pixels scaled to [0, 1])")
    key = str(mode).strip().lower()
    if key not in PREPROCESS_MODES:
        raise BadInputError(f"{param('preprocess')} {mode!r}: expected one of {', '.join(PREPROCESS_MODES)}"
                            f"{did_you_mean(key, PREPROCESS_MODES)}")
    m, s, bgr = PREPROCESS_MODES[key]
    return Preprocess(key, m, s, bgr)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelFileSpec:
    """A model file and what the user states about it: what :class:`~imgvec.embedding.embedder.EmbedConfig`
    carries as its ``model`` once resolved. ``sha256`` pins the file's content (a store's, or the one the
    main process read for its Ray workers): a file that holds other bytes is refused."""

    path: str
    preprocess: Preprocess
    layer: str = ""
    sha256: str = ""

    @property
    def format(self) -> str:
        return MODEL_SUFFIXES[Path(self.path).suffix.lower()]

    @property
    def name(self) -> str:
        return Path(self.path).name


def model_file_spec(path: str, preprocess: str | None = None, mean: Any = None, std: Any = None,
                    layer: str | None = None, sha256: str = "") -> ModelFileSpec:
    """``--model PATH`` with ``--preprocess``/``--mean``/``--std`` and ``--layer``, checked (the file itself is
    read by :func:`read_model_file`)."""
    if not is_model_path(path):
        raise BadInputError(f"{param('model')} {path!r}: a model file ends in {', '.join(MODEL_SUFFIXES)}")
    pre = parse_preprocess(preprocess, mean, std)
    return ModelFileSpec(str(Path(path).expanduser().absolute()), pre, (layer or "").strip(), sha256)


class ModelFileMismatch(MismatchError):
    """A model file holds other bytes than the ones pinned (a store's model file changed, or another file)."""

    def __init__(self, path: str, found: str, expected: str) -> None:
        super().__init__(f"{path} holds other bytes (sha256 {found}) than the model file pinned (sha256 {expected})")
        self.path, self.found, self.expected = path, found, expected


# -- the bytes, read once -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelBytes:
    """A model file read into memory and checked: what runs is ``data`` (and ``weights``, an IR's ``.bin``)."""

    path: str
    format: str  # keras | onnx | openvino
    data: bytes
    weights: bytes = b""
    sha256: str = ""  # of the file; of an IR: of the two sha256 digests, the .xml's then the .bin's

    @property
    def size(self) -> int:
        return len(self.data) + len(self.weights)

    @property
    def name(self) -> str:
        return Path(self.path).name


def _read_bounded(path: Path, what: str, empty_ok: bool = False) -> bytes:
    require_regular(path, what, missing=f"no such {what}")
    try:
        with open_regular(path) as fh:
            data = fh.read(MAX_MODEL_BYTES + 1)
    except OSError as error:
        raise BadInputError(f"{path}: cannot read {what} ({error.strerror or error})") from None
    if len(data) > MAX_MODEL_BYTES:
        raise BadInputError(f"{path}: {what} larger than {MAX_MODEL_BYTES >> 30} GiB; imgvec reads model files "
                            "whole into memory (an ONNX file cannot exceed 2 GiB anyway)")
    if not data and not empty_ok:
        raise BadInputError(f"{path}: empty {what}")
    return data


def read_model_file(spec: ModelFileSpec) -> ModelBytes:
    """Read ``spec.path`` (and an IR's ``.bin``) once, hash it, check its structure; refuse other bytes than
    ``spec.sha256`` pins. Raises :class:`BadInputError` for anything that is not a model imgvec runs safely."""
    path = Path(spec.path)
    fmt = spec.format
    data = _read_bounded(path, "model file")
    weights = b""
    if fmt == "openvino":
        weights = _read_bounded(path.with_suffix(".bin"), "IR weights file (.bin beside the .xml)", empty_ok=True)
        digest = hashlib.sha256(hashlib.sha256(data).digest() + hashlib.sha256(weights).digest()).hexdigest()
    else:
        digest = hashlib.sha256(data).hexdigest()
    if spec.sha256 and digest != spec.sha256:
        raise ModelFileMismatch(str(path), digest, spec.sha256)
    model = ModelBytes(str(path), fmt, data, weights, digest)
    if fmt == "onnx":
        check_onnx(data, path)
    elif fmt == "openvino":
        check_ir(data, weights, path)
    else:
        check_keras_archive(data, path)
    return model


# -- ONNX: a bounded walk of the protobuf, down to every TensorProto -------------------------------
class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a field runs past its message")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("truncated fixed-size field")
            yield field, wire, 0, pos
        else:
            raise _Malformed(f"wire type {wire}")


# message -> {field: message it holds}, only the paths that lead to a TensorProto (onnx/onnx.proto3).
_ONNX_SCHEMA: dict[str, dict[int, str]] = {
    "Model": {7: "Graph", 20: "TrainingInfo", 25: "Function"},
    "Graph": {1: "Node", 5: "Tensor", 15: "SparseTensor"},
    "Node": {5: "Attribute"},
    "Attribute": {5: "Tensor", 6: "Graph", 10: "Tensor", 11: "Graph", 22: "SparseTensor", 23: "SparseTensor"},
    "SparseTensor": {1: "Tensor", 2: "Tensor"},
    "TrainingInfo": {1: "Graph", 2: "Graph"},
    "Function": {7: "Node"},
}
# TensorProto.DataType -> bytes per element (strings: 0, not checked; 4-bit types: 1/2).
_ONNX_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 8: 0, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
                    16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5, 24: 1, 25: 0.5}


def _check_tensor(buf: memoryview, start: int, end: int, size: int) -> None:
    dims: list[int] = []
    dtype = 0
    name = ""
    for field, wire, a, b in _fields(buf, start, end):
        if field == 1 and wire == 0:
            dims.append(a)
        elif field == 1 and wire == 2:
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos, b)
                dims.append(value)
        elif field == 2 and wire == 0:
            dtype = a
        elif field == 8 and wire == 2:
            name = bytes(buf[a:b][:200]).decode("utf-8", "replace")
        elif field == 13 or (field == 14 and wire == 0 and a == 1):
            raise BadInputError(f"tensor {name or '(unnamed)'} keeps its data in an external file; imgvec opens no "
                                "path a model names: save the model with its tensors inside (onnx.save_model(..., "
                                "save_as_external_data=False)), under 2 GiB")
    if any(d >= 1 << 62 for d in dims):  # negative int64 dims come as huge varints
        raise _Malformed(f"tensor {name!r} has a negative or huge dimension")
    count = math.prod(dims)
    if count * _ONNX_ITEM_BYTES.get(dtype, 1) > size:
        raise BadInputError(f"tensor {name or '(unnamed)'} claims shape {dims}, more data than the whole file "
                            f"({size:,} bytes): forged or damaged")


def _walk(buf: memoryview, message: str, start: int, end: int, depth: int, size: int) -> None:
    if depth > MAX_NESTING:
        raise _Malformed(f"subgraphs nested deeper than {MAX_NESTING}")
    inner = _ONNX_SCHEMA[message]
    for field, wire, a, b in _fields(buf, start, end):
        kind = inner.get(field)
        if kind is None or wire != 2:
            continue
        if kind == "Tensor":
            _check_tensor(buf, a, b, size)
        else:
            _walk(buf, kind, a, b, depth + 1, size)


def check_onnx(data: bytes, path: Any = "") -> None:
    """Refuse an ONNX file that is not a well-formed ModelProto with a graph, keeps any tensor in an external
    file, or claims tensors larger than itself. Linear in the file's size; nothing is allocated by its claims."""
    buf = memoryview(data)
    try:
        graphs = [f for f, w, _, _ in _fields(buf, 0, len(buf)) if f == 7 and w == 2]
        if not graphs:
            raise _Malformed("no graph")
        _walk(buf, "Model", 0, len(buf), 0, len(buf))
    except _Malformed as error:
        raise BadInputError(f"{path}: not a readable ONNX model ({error})") from None
    except BadInputError as error:
        raise BadInputError(f"{path}: {error}") from None
    except RecursionError:
        raise BadInputError(f"{path}: not a readable ONNX model (nested too deeply)") from None


# -- OpenVINO IR: the XML's constants against the .bin -------------------------------------------
_IR_ITEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u64": 8, "u32": 4,
                  "u16": 2, "u8": 1, "boolean": 1, "u1": 0.125, "u4": 0.5, "i4": 0.5, "nf4": 0.5, "f8e4m3": 1,
                  "f8e5m2": 1}


def check_ir(xml: bytes, weights: bytes, path: Any = "") -> None:
    """Refuse an IR whose XML declares a DTD or entities, is not ``<net>``, or whose constants lie outside the
    ``.bin`` or disagree with their own shape."""
    import xml.etree.ElementTree as ET

    head = xml[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in xml.lower():
        raise BadInputError(f"{path}: an OpenVINO IR declares no DTD or entities; refused")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise BadInputError(f"{path}: not a readable OpenVINO IR ({error})") from None
    if root.tag != "net":
        raise BadInputError(f"{path}: not an OpenVINO IR (root element <{root.tag}>, not <net>)")
    for layer in root.iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        if data is None:
            continue
        try:
            offset, size = int(data.get("offset", "0")), int(data.get("size", "0"))
            shape = [int(d) for d in data.get("shape", "").split(",") if d.strip()]
        except ValueError:
            raise BadInputError(f"{path}: constant {layer.get('name')!r} has a malformed offset, size or shape") from None
        if offset < 0 or size < 0 or offset + size > len(weights) or any(d < 0 for d in shape):
            raise BadInputError(f"{path}: constant {layer.get('name')!r} claims bytes {offset}..{offset + size} of a "
                                f"{len(weights):,}-byte .bin: forged or damaged")
        item = _IR_ITEM_BYTES.get(str(data.get("element_type")))
        if item is not None and math.ceil(math.prod(shape) * item) > size:
            raise BadInputError(f"{path}: constant {layer.get('name')!r} claims shape {shape}, more than its {size} "
                                "bytes: forged or damaged")


# -- .keras: the archive and its config, before Keras reads it -----------------------------------
def _objects(config: Any) -> Iterator[dict[str, Any]]:
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_keras_archive(data: bytes, path: Any = "") -> None:
    """Refuse a ``.keras`` file that is not Keras' zip (config.json, metadata.json, weights files, assets/),
    unpacks beyond :data:`MAX_UNPACKED_BYTES`, or whose config names a Lambda layer, a Python function or an
    object from outside Keras: deserialising those runs code. Keras' own ``safe_mode`` refuses them too."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise BadInputError(f"{path}: not a Keras 3 .keras file (not a zip archive: {error})") from None
    names = {m.filename for m in members}
    odd = sorted(n for n in names if not (n in _KERAS_MEMBERS or n.startswith("assets/") and ".." not in n
                                          or "/" not in n and n.endswith((".json", ".h5", ".npz"))))
    if "config.json" not in names or odd:
        raise BadInputError(f"{path}: not a Keras 3 .keras file (" + (f"unexpected member {odd[0]!r}" if odd else
                                                                      "no config.json") + ")")
    if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        raise BadInputError(f"{path}: unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB; refused")
    info = archive.getinfo("config.json")
    if info.file_size > MAX_CONFIG_BYTES:
        raise BadInputError(f"{path}: config.json of {info.file_size:,} bytes; refused")
    try:
        with archive.open(info) as fh:
            config = json.loads(fh.read(MAX_CONFIG_BYTES + 1))
    except (ValueError, RecursionError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise BadInputError(f"{path}: its config.json is not readable JSON ({type(error).__name__})") from None
    for obj in _objects(config):
        name, module = obj.get("class_name"), obj.get("module")
        layer = obj.get("config", {}).get("name") if isinstance(obj.get("config"), dict) else None
        if name in ("Lambda", "__lambda__"):
            raise BadInputError(f"{path}: layer {layer or name!r} is a Lambda layer (Python code inside the model); "
                                "imgvec never runs code from a model file: rebuild the model without Lambda layers")
        if module is not None and not (isinstance(module, str) and (module == "keras" or module.startswith("keras."))):
            raise BadInputError(f"{path}: {name!r} comes from module {str(module)[:80]!r}, not from Keras; imgvec loads "
                                "no custom objects (they would run code): save a model made of Keras layers only")
