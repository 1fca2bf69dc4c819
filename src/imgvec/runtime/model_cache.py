"""The compiled-model cache: each backbone converted to OpenVINO once, kept on disk, checked on every use.

An entry is a folder ``<cache>/openvino/<backbone>-<size>px-<digest>`` holding ``model.xml``,
``model.bin`` and a manifest with their sha256 and what went in (:func:`cache_key`). It is written
under a temporary name and renamed whole, so no reader sees half an entry. The cache is data from
disk like any other: a manifest that is not what imgvec writes makes the entry be rebuilt, a folder
left by a killed conversion is listed (:func:`cache_entries`) and removed by the next conversion or
:func:`clear_cache`, and a cache that cannot be written (full disk, read-only folder) costs only the
caching: the model converted in memory is used, with a one-line :class:`RuntimeNote`.

An int8 entry (:func:`quantized_model`) is the float32 entry quantized by NNCF on a
:class:`~imgvec.runtime.engine.Calibration`; its key adds the precision, the calibration's sha256
and NNCF's version, so a second run on the same images quantizes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imgvec.backbones.registry import Backbone, Weights
from imgvec.backbones.builder import build_model, keras_weights_files, preprocess_input
from imgvec.fileio import sha256_file
from imgvec.backbones.device import import_keras, import_tensorflow
from imgvec.errors import BadInputError, param
from imgvec.runtime.engine import Calibration, RuntimeNote
from imgvec.fileio import fsync_path, open_regular
from imgvec.versions import dist_version

# Bump when the converted graph changes (what is folded in, inputs, outputs): old cache entries stop matching.
WRAPPER_VERSION = 2
MANIFEST = "manifest.json"
FAILED = "failed.json"
FILES = ("model.xml", "model.bin")
MANIFEST_MAX_BYTES = 1 << 20  # imgvec writes about 1 KB; anything larger is not its manifest
# A conversion in progress writes into ".tmp-<entry>-<pid>-<thread>"; a damaged entry is moved to ".trash-...".
_TEMP = re.compile(r"^\.(tmp|trash)-(?P<entry>(?P<backbone>[a-z0-9]+)-(?P<size>\d+)px-[0-9a-f]+)-(?P<pid>\d+)-\d+$")


class ConversionFailed(Exception):
    """OpenVINO could not convert a backbone (remembered in the cache, so it is tried once)."""


def cache_dir() -> Path:
    """``$IMGVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/imgvec``, else ``~/.cache/imgvec``."""
    if os.environ.get("IMGVEC_CACHE_DIR"):
        return Path(os.environ["IMGVEC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgvec"


def cache_key(backbone: Backbone, weights: Weights, image_size: int,
              calibration: Calibration | None = None) -> dict[str, Any]:
    """Everything that changes a converted model's output. An ImageNet entry also records the sha256
    of the weights file Keras loaded, and is rebuilt if that file changes (see :func:`_entry_ok`).
    With a ``calibration``: the int8 model quantized on it (precision, calibration sha256, NNCF version)."""
    key = {"backbone": backbone.name, "weights": weights.identity, "input_size": int(image_size),
           "wrapper": WRAPPER_VERSION, "openvino": dist_version("openvino"), "keras": dist_version("keras")}
    if calibration is not None:
        key.update(precision="int8", calibration=calibration.sha256, nncf=dist_version("nncf"))
    return key


def entry_path(backbone: Backbone, weights: Weights, image_size: int, calibration: Calibration | None = None) -> Path:
    key = json.dumps(cache_key(backbone, weights, image_size, calibration), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "openvino" / f"{backbone.name}-{image_size}px-{digest}"


# -- reading an entry: every field checked, anything else means "rebuild" ------------------------
def _read_manifest(entry: Path, name: str = MANIFEST) -> dict[str, Any] | None:
    """The JSON object in ``entry/name``; None if it is missing, not a regular file, too big or not an object."""
    try:
        with open_regular(entry / name) as fh:
            text = fh.read(MANIFEST_MAX_BYTES + 1)
        data = json.loads(text) if len(text) <= MANIFEST_MAX_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _source_unchanged(source: Any) -> bool:
    """The ImageNet weights file the entry was converted from still holds the same bytes (or is gone:
    the converted model holds the weights itself). The sha256 is recomputed only when size or mtime moved.
    A record that is not what imgvec writes counts as changed."""
    if source is None:
        return True
    fields = {"path": str, "sha256": str, "size": int, "mtime_ns": int}
    if not isinstance(source, dict) or not all(isinstance(source.get(k), t) for k, t in fields.items()):
        return False
    try:
        st = os.stat(source["path"])
    except (OSError, ValueError):
        return True
    if (st.st_size, st.st_mtime_ns) == (source["size"], source["mtime_ns"]):
        return True
    try:
        return sha256_file(source["path"]) == source["sha256"]
    except OSError:
        return False


def _entry_ok(entry: Path, key: dict[str, Any]) -> bool:
    """A complete entry for ``key`` whose files still have the sha256 its manifest lists."""
    manifest = _read_manifest(entry)
    if manifest is None or manifest.get("key") != key:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False
    try:
        if any(sha256_file(entry / name) != files.get(name) for name in FILES):
            return False
    except OSError:
        return False
    return _source_unchanged(manifest.get("source_weights"))


# -- converting ----------------------------------------------------------------------------------
def uint8_model(model: Any, backbone: Backbone, image_size: int) -> Any:
    """A Keras model taking uint8 pixels, with the backbone's ``preprocess_input`` inside, around ``model``.

    This is what OpenVINO converts: the Keras model itself converts to a faster graph than a traced
    ``tf.function`` of it (efficientnetb0 at 224 px, batch 32, on this 2-core CPU: 134 against 51
    images/s; mobilenetv2 and resnet50 about the same either way).
    """
    keras = import_keras("tensorflow")
    pixels = keras.Input((image_size, image_size, 3), dtype="uint8")
    return keras.Model(pixels, model(preprocess_input(backbone)(keras.ops.cast(pixels, "float32"))))


def _convert(backbone: Backbone, weights: Weights, image_size: int) -> tuple[Any, dict[str, Any]]:
    """The Keras model, preprocessing included, converted to an ``openvino.Model``; what went in, for the manifest."""
    tf = import_tensorflow()
    import openvino as ov

    start = time.perf_counter()
    with keras_weights_files() as fetched:
        model = build_model(backbone, weights, image_size)
    source = None
    if weights.kind == "imagenet" and fetched:
        st = os.stat(fetched[-1])
        source = {"path": str(fetched[-1]), "sha256": sha256_file(fetched[-1]), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries results (json, csv)
            with warnings.catch_warnings():  # OpenVINO calls the model with a list where Keras expects a tensor
                warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
                converted = ov.convert_model(uint8_model(model, backbone, image_size))
    except Exception as error:  # OpenVINO's frontends raise many kinds; all mean "cannot convert"
        raise ConversionFailed(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}") from error
    return converted, {"source_weights": source, "tensorflow": tf.__version__, "convert_s": time.perf_counter() - start}


def _save(converted: Any, folder: Path) -> None:
    """Write ``model.xml``/``model.bin`` into ``folder``."""
    import openvino as ov

    # save_model compresses weights to float16 by default: keep them exactly as Keras has them.
    ov.save_model(converted, str(folder / FILES[0]), compress_to_fp16=False)


def _publish(tmp: Path, entry: Path, key: dict[str, Any]) -> None:
    """Rename the finished ``tmp`` to ``entry``. If another process got there first with a good entry,
    theirs stays; a damaged one is moved aside first. Renames are atomic: no reader sees half an entry."""
    while True:
        try:
            os.rename(tmp, entry)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _entry_ok(entry, key):
            return
        trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _write_entry(converted: Any, info: dict[str, Any], entry: Path, key: dict[str, Any],
                 manifest: dict[str, Any]) -> None:
    """Save ``converted`` and its manifest under a temporary name, flush, and publish it as ``entry``."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save(converted, tmp)
        manifest = {**manifest, "files": {name: sha256_file(tmp / name) for name in FILES}, **info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in (*FILES, MANIFEST):
            fsync_path(tmp / name)
        fsync_path(tmp)
        _publish(tmp, entry, key)
        fsync_path(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remember_failure(entry: Path, key: dict[str, Any], error: ConversionFailed) -> None:
    """Keep ``failed.json`` as the entry, so the next run falls back at once (if the cache can be written)."""
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}-{threading.get_ident()}")
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / FAILED).write_text(json.dumps({"key": key, "error": str(error)}))
        os.rename(tmp, entry)
    shutil.rmtree(tmp, ignore_errors=True)


def compiled_model(backbone: Backbone, weights: Weights, image_size: int) -> Any:
    """The cached OpenVINO model (a path to ``model.xml``) for this backbone, converting it first if the
    cache has no good entry. Where the cache cannot be written, the converted ``openvino.Model`` itself,
    with a :class:`RuntimeNote`. Raises :class:`ConversionFailed` if OpenVINO cannot convert it."""
    entry = entry_path(backbone, weights, image_size)
    key = cache_key(backbone, weights, image_size)
    if _entry_ok(entry, key):
        return entry / FILES[0]
    failed = _read_manifest(entry, FAILED)
    if failed is not None and failed.get("key") == key:
        raise ConversionFailed(str(failed.get("error", "conversion failed before"))[:300])
    remove_leftovers(entry.parent)
    try:
        converted, info = _convert(backbone, weights, image_size)
    except ConversionFailed as failed_now:
        _remember_failure(entry, key, failed_now)
        raise
    manifest = {"key": key, "backbone": backbone.name, "weights": weights.describe(), "input_size": image_size,
                "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    try:
        _write_entry(converted, info, entry, key, manifest)
    except (OSError, RuntimeError) as error:  # OpenVINO's writer raises RuntimeError on a full disk
        reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        warnings.warn(f"cannot write the model cache {cache_dir()} ({reason}); {backbone.name} was converted in "
                      "memory and is converted again next time (set IMGVEC_CACHE_DIR to a folder with space)",
                      RuntimeNote, stacklevel=2)
        return converted
    return entry / FILES[0]


def import_nncf() -> Any:
    """NNCF, quiet (its progress bars would go to stdout, which carries results); one line if missing."""
    try:
        import nncf
    except ImportError as error:
        raise BadInputError(f"{param('precision')} int8 needs the nncf package, which is not installed ({error}); "
                            "pip install 'imgvec[int8]'") from None
    import logging

    nncf.set_log_level(logging.ERROR)
    return nncf


def _quantize(source: Any, pixels: Any, backbone: Backbone) -> tuple[Any, dict[str, Any]]:
    """NNCF's post-training quantization of the float32 OpenVINO model ``source`` on ``pixels``
    (one image per calibration item, every image used)."""
    nncf = import_nncf()
    import openvino as ov

    start = time.perf_counter()
    model = source if isinstance(source, ov.Model) else ov.Core().read_model(str(source))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(model, nncf.Dataset([pixels[i : i + 1] for i in range(len(pixels))]),
                                      subset_size=len(pixels))
    except Exception as error:  # NNCF raises many kinds; all mean "does not quantize"
        raise BadInputError(f"{backbone.name} does not quantize with NNCF ({type(error).__name__}: "
                            f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); use "
                            f"{param('precision')} float32") from error
    return quantized, {"quantize_s": time.perf_counter() - start, "calibration_images": len(pixels)}


def quantized_model(backbone: Backbone, weights: Weights, image_size: int, calibration: Calibration) -> Any:
    """The cached int8 OpenVINO model for this backbone calibrated on ``calibration`` (a path to
    ``model.xml``), quantizing the float32 model (:func:`compiled_model`) first if the cache has no good
    entry. Where the cache cannot be written, the quantized ``openvino.Model`` itself, with a :class:`RuntimeNote`."""
    entry = entry_path(backbone, weights, image_size, calibration)
    key = cache_key(backbone, weights, image_size, calibration)
    if _entry_ok(entry, key):
        return entry / FILES[0]
    source = compiled_model(backbone, weights, image_size)
    pixels = calibration.pixels(image_size)
    quantized, info = _quantize(source, pixels, backbone)
    base = {} if not isinstance(source, Path) else _read_manifest(source.parent) or {}
    info["source_weights"] = base.get("source_weights")
    manifest = {"key": key, "backbone": backbone.name,
                "weights": f"{weights.describe()}, int8 (calibrated on {len(pixels)} images)",
                "input_size": image_size, "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    try:
        _write_entry(quantized, info, entry, key, manifest)
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        warnings.warn(f"cannot write the model cache {cache_dir()} ({reason}); {backbone.name} was quantized in "
                      "memory and is quantized again next time (set IMGVEC_CACHE_DIR to a folder with space)",
                      RuntimeNote, stacklevel=2)
        return quantized
    return entry / FILES[0]


# -- listing and clearing ----------------------------------------------------------------------------
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _leftover_pid(folder: Path) -> int | None:
    """The process that wrote temporary ``folder`` (``.tmp-``/``.trash-``), or None for anything else."""
    match = _TEMP.match(folder.name)
    return int(match["pid"]) if match else None


def remove_leftovers(root: Path) -> int:
    """Remove the temporary folders of conversions whose process is gone (killed); how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for folder in root.iterdir():
            pid = _leftover_pid(folder)
            if pid is not None and not _process_alive(pid) and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    return removed


@dataclass
class CacheEntry:
    path: Path
    backbone: str
    input_size: int
    weights: str
    bytes: int
    created: str
    age_s: float
    ok: bool  # complete and undamaged, for this OpenVINO and Keras
    error: str = ""  # why OpenVINO could not convert it (TensorFlow runs this model instead)
    writer_pid: int | None = None  # a temporary folder: the process converting into it

    @property
    def leftover(self) -> bool:
        """A temporary folder whose conversion was killed: removed by the next conversion or ``clear_cache``."""
        return self.writer_pid is not None and not _process_alive(self.writer_pid)

    @property
    def state(self) -> str:
        """One line for ``imgvec cache``'s ok column."""
        if self.ok:
            return "yes"
        if self.writer_pid is not None:
            if self.leftover:
                return "no: left by an interrupted conversion (removed by the next conversion or imgvec cache --clear)"
            return f"no: being converted by process {self.writer_pid}"
        return f"no: does not convert ({self.error})" if self.error else "no (rebuilt on next use)"


def _folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.iterdir():
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
    return total


def _well_formed(key: dict[str, Any]) -> bool:
    """A key as :func:`cache_key` writes it (the fields and their types)."""
    types = {"backbone": str, "weights": str, "input_size": int, "wrapper": int, "openvino": str, "keras": str}
    if "precision" in key:  # an int8 entry
        types.update(precision=str, calibration=str, nncf=str)
    return key.keys() == types.keys() and all(isinstance(key[k], t) for k, t in types.items())


def cache_entries() -> list[CacheEntry]:
    """The compiled models in the cache (and temporary folders of conversions), newest first."""
    root = cache_dir() / "openvino"
    entries = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_dir() or entry.is_symlink():
            continue
        try:
            size, age = _folder_bytes(entry), time.time() - entry.stat().st_mtime
        except OSError:  # removed meanwhile (a conversion finished)
            continue
        if entry.name.startswith("."):
            match = _TEMP.match(entry.name)
            if match:
                entries.append(CacheEntry(entry, match["backbone"], int(match["size"]), "?", size, "", age, False,
                                          writer_pid=int(match["pid"])))
            continue
        failed = _read_manifest(entry, FAILED) or {}
        manifest = _read_manifest(entry) or failed
        key = manifest.get("key")
        key = key if isinstance(key, dict) else {}
        size_px = key.get("input_size")
        current = {**key, "wrapper": WRAPPER_VERSION, "openvino": dist_version("openvino"), "keras": dist_version("keras")}
        if "nncf" in key:
            current["nncf"] = dist_version("nncf")
        ok = _well_formed(key) and _entry_ok(entry, current)
        entries.append(CacheEntry(entry, str(key.get("backbone", "?")), size_px if isinstance(size_px, int) else 0,
                                  str(manifest.get("weights", key.get("weights", "?"))), size,
                                  str(manifest.get("created", "")), age, ok, str(failed.get("error", ""))[:300]))
    return sorted(entries, key=lambda e: e.age_s)


def clear_cache() -> tuple[int, int]:
    """Remove every compiled model (and leftovers of interrupted conversions); (entries, bytes) freed."""
    root = cache_dir() / "openvino"
    if not root.is_dir():
        return 0, 0
    entries = [e for e in root.iterdir() if e.is_dir() and not e.is_symlink()]
    freed = sum(f.stat().st_size for e in entries for f in e.rglob("*") if f.is_file())
    for e in entries:
        shutil.rmtree(e, ignore_errors=True)
    return sum(not e.name.startswith(".") for e in entries), freed
