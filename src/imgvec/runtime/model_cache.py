"""The compiled-model cache: each backbone converted to OpenVINO once, kept on disk, checked on every use.

An entry is a folder ``<cache>/openvino/<backbone>-<size>px-<digest>`` holding ``model.xml``,
``model.bin`` and a manifest with their sha256 and what went in (:func:`cache_key`). It is written
under a temporary name and renamed whole, so no reader sees half an entry. The cache is data from
disk like any other: a manifest that is not what imgvec writes makes the entry be rebuilt, a folder
left by a killed conversion is listed (:func:`cache_entries`) and removed by the next conversion or
:func:`clear_cache`, and a cache that cannot be written (full disk, read-only folder) costs only the
caching: the model converted in memory is used, with a one-line :class:`RuntimeNote`.

The cache is not trusted more than a file from elsewhere: a cache folder other users can write is not
used (as OpenSSH treats key files), and every manifest carries an HMAC made with a key kept outside the
cache (``$XDG_CONFIG_HOME/imgvec/cache.key``, readable by its owner only), so an entry edited by anyone
who can write the cache but not read the key is rebuilt, with one note. OpenVINO is handed the very
bytes that were checked, never a path it would read again.

An int8 entry (:func:`quantized_model`) is the float32 entry quantized by NNCF on a
:class:`~imgvec.runtime.engine.Calibration`; its key adds the precision, the calibration's sha256
and NNCF's version, so a second run on the same images quantizes nothing. It is written, checked
(HMAC and sha256) and handed to OpenVINO as its checked bytes like every other entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from imgvec.backbones.modelfile import ModelBytes
from imgvec.backbones.registry import Backbone, Weights
from imgvec.backbones.builder import build_model, check_weights_at_hand, keras_weights_files, preprocess_input
from imgvec.fileio import sha256_file
from imgvec.backbones.device import import_keras, import_tensorflow
from imgvec.errors import first_line
from imgvec.runtime.engine import Calibration, RuntimeNote
from imgvec.fileio import TempName, fsync_path, open_regular, temp_name, temp_path
from imgvec.errors import BadInputError, param
from imgvec.versions import dist_version

# Bump when the converted graph changes (what is folded in, inputs, outputs): old cache entries stop matching.
WRAPPER_VERSION = 2
MANIFEST = "manifest.json"
FAILED = "failed.json"
FILES = ("model.xml", "model.bin")
BLOB = "compiled.blob"  # a model compiled for this CPU (OpenVINO's export)
MANIFEST_MAX_BYTES = 1 << 20  # imgvec writes about 1 KB; anything larger is not its manifest
MODEL_MAX_BYTES = 4 << 30  # the largest registry backbone (VGG19, float32) is 0.6 GB
KEY_BYTES = 32
# An entry's name; a conversion in progress writes into fileio.temp_path(entry) (".<entry>.tmp-HOST-PID-RANDOM"),
# and a damaged entry is moved to fileio.temp_path(entry, "trash") before it is removed.
_ENTRY = re.compile(r"(?P<backbone>[a-z0-9]+)-(?P<size>\d+)px-[0-9a-f]+")


class ConversionFailed(Exception):
    """OpenVINO could not convert a backbone (remembered in the cache, so it is tried once)."""


def cache_dir() -> Path:
    """``$IMGVEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/imgvec``, else ``~/.cache/imgvec``."""
    if os.environ.get("IMGVEC_CACHE_DIR"):
        return Path(os.environ["IMGVEC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgvec"


def key_path() -> Path:
    """Where the cache's HMAC key lives: outside the cache, so whoever can write the cache cannot rewrite it."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "imgvec" / "cache.key"


def _owned_and_private(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & 0o077


def cache_secret() -> bytes:
    """This user's cache key, made on first use (0600, never through a link); OSError or ValueError when it
    cannot be made or is not this user's alone."""
    path = key_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned_and_private(st) or st.st_size != KEY_BYTES:
            raise ValueError(f"{path} is not a {KEY_BYTES}-byte file readable by its owner only")
        return os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)


def untrusted(root: Path) -> str | None:
    """Why the cache folder ``root`` cannot be trusted, or None: it, or a folder above it, can be written
    by another user (a sticky folder above it, such as /tmp, is fine: others cannot rename what is ours)."""
    here = root.absolute()
    first = True
    while True:
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            st = None  # made by the first conversion, with this user's umask (checked next time)
        if st is not None:
            if stat.S_ISLNK(st.st_mode) and not first:
                here = here.resolve()
                continue
            mine = st.st_uid in (os.geteuid(), 0)
            shared = st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and not first)
            if not mine or shared:
                who = "owned by another user" if not mine else f"writable by other users (mode {st.st_mode & 0o7777:o})"
                return f"{here} is {who}"
        if here.parent == here:
            return None
        here, first = here.parent, False


def _mac(secret: bytes, key: dict[str, Any], files: dict[str, Any]) -> str:
    return hmac.new(secret, json.dumps({"key": key, "files": files}, sort_keys=True).encode(), "sha256").hexdigest()


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
    return _entry_for(cache_key(backbone, weights, image_size, calibration))


def _entry_for(key: dict[str, Any]) -> Path:
    """The folder of the cache entry for ``key``: named for a person (what, at which size), told apart by the key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "openvino" / f"{key['backbone']}-{int(key['input_size'])}px-{digest}"


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


def _read_file(path: Path, limit: int) -> bytes:
    with open_regular(path) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is over {limit} bytes")
    return data


def _verified(entry: Path, key: dict[str, Any]) -> tuple[bytes, ...] | None:
    """The bytes of the entry's files (:func:`_names`), if the entry is complete for ``key``, their sha256 are what
    its manifest lists and the manifest's HMAC is this user's; else None (the entry is rebuilt)."""
    manifest = _read_manifest(entry)
    if manifest is None or manifest.get("key") != key:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    try:
        secret = cache_secret()
        if not hmac.compare_digest(str(manifest.get("mac", "")), _mac(secret, key, files)):
            return None
        names = _names(key)
        data = tuple(_read_file(entry / name, MODEL_MAX_BYTES) for name in names)
    except (OSError, ValueError):
        return None
    if files.keys() != set(names) or any(hashlib.sha256(blob).hexdigest() != files[name]
                                         for name, blob in zip(names, data)):
        return None
    return data if _source_unchanged(manifest.get("source_weights")) else None


def _entry_ok(entry: Path, key: dict[str, Any]) -> bool:
    """A complete entry for ``key`` whose files still have the sha256 its manifest lists, made by this user."""
    return _verified(entry, key) is not None


def _names(key: dict[str, Any]) -> tuple[str, ...]:
    """The files an entry for ``key`` holds: a compiled model's blob, or a model's IR."""
    return (BLOB,) if "compiled_for" in key else FILES


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
    check_weights_at_hand(backbone, weights, image_size)  # no network: say so before TensorFlow loads
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
        raise ConversionFailed(f"{type(error).__name__}: {first_line(error, '', 200)}") from error
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
        trash = temp_path(entry, "trash")
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _manifest(key: dict[str, Any], weights: str) -> dict[str, Any]:
    """What an entry's manifest says besides its files: the key, and for people what it is and when it was made."""
    return {"key": key, "backbone": key["backbone"], "weights": weights, "input_size": key["input_size"],
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}


def _write_entry(save: Callable[[Path], None], info: dict[str, Any], entry: Path, key: dict[str, Any],
                 manifest: dict[str, Any]) -> None:
    """``save(folder)`` the entry's files and write its manifest under a temporary name, flush, and publish it as
    ``entry``."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(entry)
    tmp.mkdir()
    names = _names(key)
    try:
        save(tmp)
        files = {name: sha256_file(tmp / name) for name in names}
        manifest = {**manifest, "files": files, **info, "mac": _mac(cache_secret(), key, files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in (*names, MANIFEST):
            fsync_path(tmp / name)
        fsync_path(tmp)
        _publish(tmp, entry, key)
        fsync_path(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remember_failure(entry: Path, key: dict[str, Any], error: ConversionFailed) -> None:
    """Keep ``failed.json`` as the entry, so the next run falls back at once (if the cache can be written)."""
    tmp = temp_path(entry)
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / FAILED).write_text(json.dumps({"key": key, "error": str(error)}))
        os.rename(tmp, entry)
    shutil.rmtree(tmp, ignore_errors=True)


def _note(message: str) -> None:
    warnings.warn(message, RuntimeNote, stacklevel=3)


def compiled_model(backbone: Backbone, weights: Weights, image_size: int) -> Any:
    """The cached OpenVINO model (a path to ``model.xml``) for this backbone, converting it first if the
    cache has no good entry. Where the cache cannot be written or trusted, the converted ``openvino.Model``
    itself, with a :class:`RuntimeNote`. Raises :class:`ConversionFailed` if OpenVINO cannot convert it."""
    return _cached(backbone, weights, image_size, load=False)


def load_model(backbone: Backbone, weights: Weights, image_size: int) -> Any:
    """The cached model as an ``openvino.Model`` made from the bytes that were checked (one read, no path
    for OpenVINO to read again after the check), converting it first if needed."""
    return _cached(backbone, weights, image_size, load=True)


def _distrust() -> str | None:
    """Why the cache cannot be used (a folder others can write, a key that is not this user's alone), or None."""
    why = untrusted(cache_dir())
    if why is None:
        try:
            cache_secret()
        except (OSError, ValueError) as error:
            why = f"its key cannot be used ({getattr(error, 'strerror', None) or error})"
    return None if why is None else f"{why} (chmod go-w it, or set IMGVEC_CACHE_DIR to a folder of your own)"


def _cached(backbone: Backbone, weights: Weights, image_size: int, load: bool) -> Any:
    key = cache_key(backbone, weights, image_size)
    return _through_cache(key, backbone.name, lambda: _convert(backbone, weights, image_size), weights.describe(),
                          "converted", load, remember_failures=True)


def _through_cache(key: dict[str, Any], name: str, make: Callable[[], tuple[Any, dict[str, Any]]],
                   weights: str, made: str, load: bool = True, remember_failures: bool = False) -> Any:
    """The one way a model goes through the cache (converted backbones, .keras files, int8 models).

    The entry for ``key`` (:func:`_entry_for`), if it verifies: an ``openvino.Model`` from its checked bytes (``load``)
    or its ``model.xml``. Otherwise ``make()`` (the model and its info for the manifest) is cached and
    returned; where the cache cannot be trusted or written, returned as made with one note. ``weights``
    describes the source in the manifest (``make``'s info may say more, and is written after it). ``made`` says
    what ``make`` does in those notes ("converted", "quantized"); ``remember_failures``: a conversion that
    failed is recorded, and fails at once next time.
    """
    entry = _entry_for(key)
    why = _distrust()
    if why is None:
        data = _verified(entry, key)
        if data is not None:
            return _from_bytes(data) if load else entry / FILES[0]
        failed = _read_manifest(entry, FAILED) if remember_failures else None
        if failed is not None and failed.get("key") == key:
            raise ConversionFailed(str(failed.get("error", "conversion failed before"))[:300])
        if _read_manifest(entry) is not None:
            _note(f"{entry} did not verify (damaged or edited, its source weights changed, or another user or machine "
                  f"made it): {made} again")
    try:
        model, info = make()
    except ConversionFailed as error:
        if why is None and remember_failures:
            _remember_failure(entry, key, error)
        raise
    if why is not None:
        _note(f"the model cache is not used: {why}; {name} was {made} in memory")
        return model
    remove_leftovers(entry.parent)
    try:
        _write_entry(lambda folder: _save(model, folder), info, entry, key, _manifest(key, weights))
    except (OSError, RuntimeError, ValueError) as error:  # OpenVINO's writer raises RuntimeError on a full disk
        reason = getattr(error, "strerror", None) or first_line(error, limit=200)
        warnings.warn(f"cannot write the model cache {cache_dir()} ({reason}); {name} was {made} in memory and is "
                      f"{made} again next time (set IMGVEC_CACHE_DIR to a folder with space)", RuntimeNote, stacklevel=3)
        return model
    return model if load else entry / FILES[0]


def _from_bytes(data: tuple[bytes, ...]) -> Any:
    import openvino as ov

    xml, weights = data
    return ov.Core().read_model(xml, ov.Tensor(np.frombuffer(weights, np.uint8).copy()))


# -- a model compiled for this CPU, imported instead of compiled again ----------------------------------
def cpu_identity() -> str:
    """What a compiled model is compiled for: the CPU's name and instruction sets and the cores this process may
    use (OpenVINO picks kernels by instruction set, and streams by cores)."""
    import platform

    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = platform.processor() or platform.machine()
    return f"{name}; {cores} cores; flags sha256 {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def compiled_for_cpu(key: dict[str, Any], config: dict[str, Any], source: Callable[[], Any], described: str) -> Any:
    """The ``openvino.CompiledModel`` of the model cached under ``key`` (``source()`` gives it, itself through the
    cache), compiled for this CPU with ``config``. The compiled model is cached too (OpenVINO's export, checked
    like every entry): importing it skips reading the model's IR and compiling it (mobilenetv2: 0.05 s instead
    of 0.14 s). A blob OpenVINO will not import is compiled again; where the cache cannot be used, nothing is kept."""
    import io

    ckey = {**key, "compiled_for": cpu_identity(), "config": {k: str(v) for k, v in sorted(config.items())}}
    entry = _entry_for(ckey)
    trusted = _distrust() is None
    data = _verified(entry, ckey) if trusted else None
    if data is not None:
        import openvino as ov

        try:
            return ov.Core().import_model(io.BytesIO(data[0]), "CPU", config)
        except RuntimeError as error:  # another build of OpenVINO's plugin, say: compile it again
            _note(f"{entry} did not import ({first_line(error, limit=200)}): compiled again")
    elif trusted and _read_manifest(entry) is not None:
        _note(f"{entry} did not verify (damaged or edited, its source weights changed, or another user or machine "
              "made it): compiled again")
    model = source()  # first: it says what is missing (weights offline) before OpenVINO loads
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", config)
    if trusted:
        # rebuilt, like the model's entry, if the weights file it was converted from changes
        info = {"source_weights": (_read_manifest(_entry_for(key)) or {}).get("source_weights")}
        with contextlib.suppress(OSError, RuntimeError, ValueError):  # costs only the caching; the model is cached
            remove_leftovers(entry.parent)
            _write_entry(lambda folder: (folder / BLOB).write_bytes(compiled.export_model().getvalue()), info,
                         entry, ckey, _manifest(ckey, f"{described}, compiled for this CPU"))
    return compiled


# -- a user's .keras file, converted once like a backbone ------------------------------------------
KERAS_FILE = "kerasfile"  # the "backbone" of a .keras model file's cache entry
MIN_SAFE_KERAS = (3, 11)  # Keras releases before 3.11 let a .keras file run code despite safe_mode (CVE-2025-1550, -8747)


def keras_file_key(model: ModelBytes, layer: str) -> dict[str, Any]:
    """The cache key of a .keras file: its content (sha256) and the layer taken, not its name or place."""
    return {"backbone": KERAS_FILE, "weights": f"sha256={model.sha256}" + (f", layer={layer}" if layer else ""),
            "input_size": 0, "wrapper": WRAPPER_VERSION, "openvino": dist_version("openvino"),
            "keras": dist_version("keras")}


def _load_keras_file(model: ModelBytes, layer: str) -> Any:
    """The Keras model in ``model.data`` (those bytes, written to a private temporary file), safe mode, uncompiled;
    with ``layer``, the model up to that layer's output."""
    import tempfile

    version = tuple(int(p) for p in re.findall(r"\d+", dist_version("keras"))[:2])
    if version < MIN_SAFE_KERAS:
        raise BadInputError(f"{model.path}: loading .keras files needs Keras >= {'.'.join(map(str, MIN_SAFE_KERAS))} "
                            f"(older releases can run code from the file); this is {dist_version('keras')}")
    keras = import_keras("tensorflow")
    with tempfile.TemporaryDirectory(prefix="imgvec-model-") as folder:
        copy = Path(folder) / "model.keras"
        try:
            copy.write_bytes(model.data)
        except OSError as error:
            raise BadInputError(f"{model.path}: cannot stage it for Keras in {folder} ({error.strerror or error})") from None
        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = keras.saving.load_model(copy, safe_mode=True, compile=False)
        except Exception as error:  # Keras raises ValueError, TypeError, KeyError ... for what it cannot load
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise BadInputError(f"{model.path}: Keras cannot load it safely ({type(error).__name__}: {first})") from None
    if not isinstance(loaded, keras.Model):
        raise BadInputError(f"{model.path}: holds a {type(loaded).__name__}, not a Keras model")
    if layer:
        names = [lay.name for lay in loaded.layers]
        if layer not in names:
            raise BadInputError(f"{param('layer')} {layer!r}: {model.name} has no such layer (its last layers: "
                                f"{', '.join(names[-5:])})")
        loaded = keras.Model(loaded.inputs, loaded.get_layer(layer).output)
    return loaded


def keras_file_model(model: ModelBytes, layer: str = "") -> Any:
    """The OpenVINO model of a user's .keras file (float input as the file has it, its outputs unchanged), from
    the cache's checked bytes, converted on first use (imports TensorFlow); the ``openvino.Model`` itself where
    the cache cannot be written or trusted. A cached model is loaded without TensorFlow."""
    def convert() -> tuple[Any, dict[str, Any]]:
        import_tensorflow()
        import openvino as ov

        start = time.perf_counter()
        keras_model = _load_keras_file(model, layer)
        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = ov.convert_model(keras_model)
        except Exception as error:
            raise BadInputError(f"{model.path}: OpenVINO cannot convert this Keras model ({type(error).__name__}: "
                                f"{first_line(error, limit=200)})") from None
        return converted, {"source_weights": None, "convert_s": time.perf_counter() - start}

    described = f"model file {model.name} (sha256 {model.sha256[:12]}...)" + (f", layer {layer}" if layer else "")
    return _through_cache(keras_file_key(model, layer), model.name, convert, described, "converted")


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


def _quantize(source: Any, pixels: Any, name: str, batch: int | None = None) -> tuple[Any, dict[str, Any]]:
    """NNCF's post-training quantization of the float32 ``openvino.Model`` ``source`` on ``pixels`` (every image
    used; one per calibration item, or ``batch`` a item, cycled, for a model that fixes its batch size)."""
    nncf = import_nncf()

    step = batch or 1
    items = [np.take(pixels, range(i, i + step), axis=0, mode="wrap") for i in range(0, len(pixels), step)]
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(source, nncf.Dataset(items), subset_size=len(items))
    except Exception as error:  # NNCF raises many kinds; all mean "does not quantize"
        raise BadInputError(f"{name} does not quantize with NNCF ({type(error).__name__}: "
                            f"{first_line(error, '', 200)}); use {param('precision')} float32") from error
    return quantized, {"quantize_s": time.perf_counter() - start, "calibration_images": len(pixels)}


def _quantized(key: dict[str, Any], name: str, described: str, image_size: int,
               source: Any, calibration: Calibration, load: bool, batch: int | None = None) -> Any:
    """The int8 entry for ``key``: the model ``source()`` gives (float32 ``openvino.Model``, source weights
    record) quantized on ``calibration``, through the cache like every compiled model (see
    :func:`quantized_model`)."""
    def quantize() -> tuple[Any, dict[str, Any]]:
        model, source_weights = source()
        pixels = calibration.pixels(image_size)
        quantized, info = _quantize(model, pixels, name, batch)
        info["source_weights"] = source_weights  # rebuilt, like the float32 entry, if the weights file changes
        info["weights"] = f"{described}, int8 (calibrated on {len(pixels)} images)"  # the images that decoded
        return quantized, info

    return _through_cache(key, name, quantize, f"{described}, int8", "quantized", load)


def quantized_model(backbone: Backbone, weights: Weights, image_size: int, calibration: Calibration,
                    load: bool = True) -> Any:
    """The int8 OpenVINO model for this backbone calibrated on ``calibration``: an ``openvino.Model`` made
    from the cache entry's checked bytes (``load``), else a path to the entry's ``model.xml``. Without a
    verified entry, the float32 model (:func:`load_model`, itself checked) is quantized and the result
    cached like every compiled model. Where the cache cannot be trusted or written, the quantized
    ``openvino.Model`` itself, with a :class:`RuntimeNote`."""
    def source() -> tuple[Any, Any]:
        model = load_model(backbone, weights, image_size)  # the float32 entry's checked bytes (or converted)
        return model, (_read_manifest(entry_path(backbone, weights, image_size)) or {}).get("source_weights")

    return _quantized(cache_key(backbone, weights, image_size, calibration), backbone.name, weights.describe(),
                      image_size, source, calibration, load)


MODEL_FILE = "modelfile"  # the "backbone" of a model file's int8 cache entry


def quantized_file_model(model: Any, identity: str, image_size: int, name: str, calibration: Calibration,
                         batch: int | None = None) -> Any:
    """A user's model file quantized to int8 on ``calibration``: ``model`` is its prepared float32
    ``openvino.Model`` (uint8 pixels in, preprocessing inside), ``identity`` what decides its output (the file's
    sha256, preprocessing and layer; never its name or place). Cached and checked like :func:`quantized_model`;
    an ``openvino.Model`` from the entry's checked bytes."""
    key = {"backbone": MODEL_FILE, "weights": identity, "input_size": int(image_size), "wrapper": WRAPPER_VERSION,
           "openvino": dist_version("openvino"), "keras": dist_version("keras"), "precision": "int8",
           "calibration": calibration.sha256, "nncf": dist_version("nncf")}
    return _quantized(key, name, f"model file {name}", int(image_size), lambda: (model.clone(), None),
                      calibration, True, batch)


# -- listing and clearing ----------------------------------------------------------------------------
def remove_leftovers(root: Path) -> int:
    """Remove the temporary folders of conversions whose process on this machine is gone (killed); how many.
    Another machine's (a cache shared over the network) are left alone: only it knows whether they are live."""
    removed = 0
    with contextlib.suppress(OSError):
        for folder in root.iterdir():
            temp = temp_name(folder.name)
            if temp is not None and temp.stale and folder.is_dir() and not folder.is_symlink():
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
    compiled_for: str = ""  # a compiled model's CPU, where it is not this one (a cache shared between machines)
    writer: TempName | None = None  # a temporary folder: the process converting into it

    @property
    def writer_pid(self) -> int | None:
        return self.writer.pid if self.writer else None

    @property
    def leftover(self) -> bool:
        """A temporary folder whose conversion was killed: removed by the next conversion or ``clear_cache``."""
        return self.writer is not None and self.writer.stale

    @property
    def state(self) -> str:
        """One line for ``imgvec cache``'s ok column."""
        if self.ok:
            return "yes"
        if self.writer is not None:
            if self.leftover:
                return "no: left by an interrupted conversion (removed by the next conversion or imgvec cache --clear)"
            elsewhere = "" if self.writer.here else " on another machine"
            return f"no: being converted by process {self.writer.pid}{elsewhere}"
        if self.compiled_for:
            return f"no: compiled for another CPU ({self.compiled_for}); this one compiles its own"
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
    if "compiled_for" in key:  # a compiled model
        types.update(compiled_for=str, config=dict)
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
            temp = temp_name(entry.name)
            match = _ENTRY.fullmatch(temp.target) if temp else None
            if match:
                entries.append(CacheEntry(entry, match["backbone"], int(match["size"]), "?", size, "", age, False,
                                          writer=temp))
            continue
        failed = _read_manifest(entry, FAILED) or {}
        manifest = _read_manifest(entry) or failed
        key = manifest.get("key")
        key = key if isinstance(key, dict) else {}
        size_px = key.get("input_size")
        current = {**key, "wrapper": WRAPPER_VERSION, "openvino": dist_version("openvino"), "keras": dist_version("keras")}
        if "nncf" in key:
            current["nncf"] = dist_version("nncf")
        if "compiled_for" in key:
            current["compiled_for"] = cpu_identity()
        ok = _well_formed(key) and _entry_ok(entry, current)
        theirs = key.get("compiled_for")
        other_cpu = str(theirs) if "compiled_for" in key and theirs != current["compiled_for"] else ""
        entries.append(CacheEntry(entry, str(key.get("backbone", "?")), size_px if isinstance(size_px, int) else 0,
                                  str(manifest.get("weights", key.get("weights", "?"))), size,
                                  str(manifest.get("created", "")), age, ok, str(failed.get("error", ""))[:300],
                                  compiled_for=other_cpu[:200]))
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
