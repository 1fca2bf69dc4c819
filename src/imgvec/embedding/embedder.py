"""Turning image files into embeddings with one backbone.

Files are decoded by a thread pool (Pillow releases the GIL while it decodes and resizes)
a few batches ahead of the model, so decoding overlaps inference. The model is an engine from
:mod:`imgvec.runtime.loader` (OpenVINO on the CPU, TensorFlow on a GPU, by default) that takes uint8
pixels and does the backbone's own ``preprocess_input`` itself.

Each batch goes through the engine ``model_batch`` images at a time (16 on the CPU, the whole
batch on a GPU; see :mod:`imgvec.runtime.loader`). ``batch_size`` sets how many images are decoded,
yielded and stored together; results are the same either way.

``precision="int8"`` runs OpenVINO's int8 model quantized by NNCF on a sample of the user's own images
(:func:`calibration_sample`, up to :data:`CALIBRATION_IMAGES`); before a store is written with it,
:meth:`Embedder.check_int8` measures on another sample what it changes against float32 and refuses
below :data:`INT8_MIN_MEDIAN_COSINE` / :data:`INT8_MIN_OVERLAP`.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence, cast

import numpy as np

from imgvec.backbones.modelfile import ModelFileMismatch, ModelFileSpec, is_model_path, model_file_spec
from imgvec.backbones.registry import DEFAULT_BACKBONE, DEFAULT_SEED, Backbone, Weights, get_backbone, parse_weights
from imgvec.backbones.builder import resolve_weights
from imgvec.checks import check_at_least, check_choice, check_image_size
from imgvec.fileio import sha256_file
from imgvec.backbones.device import DEVICES, PRECISIONS
from imgvec.errors import BadInputError, ImageSkipped, MismatchError, param
from imgvec.files.images import DEFAULT_MAX_PIXELS, STATS_COLUMNS, load_image_stats
from imgvec.files.provenance import Provenance, random_init_family
from imgvec.runtime.loader import (RUNTIMES, Calibration, Engine, PreparedModel, dist_version, load_engine,
                                   load_model_file_engine, prepare_model_file, row_cosines)

# Peak memory of one model call per input pixel of each image, rounded up from what was measured:
# 53-445 bytes (OpenVINO on the CPU: mobilenetv3small, efficientnetb0, resnet50, convnexttiny at 224-448 px).
ACTIVATION_BYTES_PER_PIXEL = 512
MODEL_CALL_IMAGES = 32  # at most this many images go through the model at once on the CPU (runtime.py)

# int8: the calibration sample, and the check against float32 before a store is written with it.
CALIBRATION_IMAGES = 100  # NNCF's own default subset is 300; 100 took seconds and kept the neighbours
INT8_CHECK_IMAGES = 200
INT8_NEIGHBOURS = 10
INT8_MIN_MEDIAN_COSINE = 0.98  # per-row cosine of int8 to float32 embeddings, median over the check sample
INT8_MIN_OVERLAP = 0.9  # mean share of each image's top-10 neighbours (within the sample) that int8 keeps


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced (every class of a sorted folder, not only the first)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def calibration_sample(keys: Sequence[str], n: int = CALIBRATION_IMAGES) -> list[str]:
    """The images an int8 model is calibrated on: up to ``n`` of ``keys`` in sorted order, evenly spaced."""
    return spread(sorted(keys), n)


def check_sample(keys: Sequence[str], calibration: Sequence[str], n: int = INT8_CHECK_IMAGES) -> list[str]:
    """The images int8 is checked on: others than the calibration's where the folder has enough, else any."""
    taken = set(calibration)
    rest = [k for k in sorted(keys) if k not in taken]
    return spread(rest if len(rest) > INT8_NEIGHBOURS else sorted(keys), n)


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each row's ``k`` nearest rows (cosine, itself left out) under ``a`` that ``b`` keeps."""
    def top(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(ta.tolist(), tb.tolist())]))


@dataclass(frozen=True)
class Int8Check:
    """What int8 changed against float32 on a sample of the user's images."""

    images: int
    median_cosine: float
    min_cosine: float
    overlap: float  # top-``k`` neighbour overlap within the sample, float32 vs int8
    k: int

    def describe(self) -> str:
        return (f"median cosine to float32 {self.median_cosine:.4f} (lowest {self.min_cosine:.4f}), "
                f"top-{self.k} neighbour overlap {self.overlap:.3f}, on {self.images} images")


def batch_bytes(batch_size: int, image_size: int) -> int:
    """Rough peak memory of embedding one batch: the images as float32 plus the backbone's activations
    (:data:`ACTIVATION_BYTES_PER_PIXEL` per pixel for the images that go through the model at once)."""
    pixels = image_size * image_size
    return batch_size * pixels * 3 * 4 + min(batch_size, MODEL_CALL_IMAGES) * pixels * ACTIVATION_BYTES_PER_PIXEL


def machine_memory() -> int:
    """The memory this process may use: the physical RAM, or a smaller cgroup (container) limit."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


@dataclass
class EmbeddedBatch:
    """One model call's worth of results, in input order."""

    indices: np.ndarray  # positions in the input sequence of the rows below
    embeddings: np.ndarray  # float32, len(indices) x dim
    skipped: list[ImageSkipped] = field(default_factory=list)
    stats: np.ndarray | None = None  # float32, len(indices) x 5: images.STATS_COLUMNS of each decoded image


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """How images become rows and how the model runs: one value, made once (by the CLI or a notebook)
    and passed unchanged through the api and ingest to the :class:`Embedder` and to Ray workers.

    ``model``, ``weights``, ``image_size`` and ``precision`` left as None mean: the store's own when
    a store is resumed, else efficientnetlite0, ImageNet weights, the backbone's input size and float32.
    ``model`` is a registry backbone's name or a model file's path (``.keras``, ``.onnx``, ``.xml``); for a
    model file, ``preprocess`` (or ``mean``/``std``) says how its pixels are scaled and ``layer`` which
    output is the embedding (:mod:`imgvec.backbones.modelfile`).
    Fields are given by name only; a variant is ``dataclasses.replace(config, ...)``.
    """

    model: str | ModelFileSpec | None = None
    weights: str | Weights | None = None  # imagenet, none (random, ``seed``), a weights file
    image_size: int | None = None
    seed: int = DEFAULT_SEED
    batch_size: int = 32
    workers: int | None = None  # decoding threads (default: the CPU count)
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    precision: str | None = None
    runtime: str = "auto"
    preprocess: str | None = None  # a model file's: tf | torch | caffe | none
    mean: str | tuple[float, ...] | None = None  # or its mean and std, on pixels scaled to [0, 1]
    std: str | tuple[float, ...] | None = None
    layer: str | None = None  # a model file's output (or tensor) to embed with
    calibration: Calibration | None = None  # int8: the images it is quantized on (chosen from the folder if None)

    @property
    def chooses_embedding(self) -> bool:
        """Whether it says what the rows mean (backbone, weights, size, a model file's settings), not only how to run."""
        return any(v is not None for v in (self.model, self.weights, self.image_size, self.preprocess, self.mean,
                                           self.std, self.layer))

    @property
    def model_file_options(self) -> dict[str, Any]:
        return dict(preprocess=self.preprocess, mean=self.mean, std=self.std, layer=self.layer)

    def running(self) -> dict[str, Any]:
        """How to run, whatever the rows mean: what :meth:`Embedder.from_provenance` takes besides the provenance."""
        return dict(batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels, device=self.device,
                    precision=self.precision or "float32", runtime=self.runtime)


class Embedder:
    """Embeds images with a headless keras.applications backbone.

    Parameters are checked when the embedder is made; the model itself is loaded on first
    use (or by :meth:`load`), since that may convert it, import TensorFlow or fetch weights.
    ``runtime`` is one of :data:`imgvec.runtime.loader.RUNTIMES` (``auto``: OpenVINO on the CPU,
    TensorFlow on a GPU); the embeddings agree whichever runs.

    ``model`` may be a model file (a path ending in ``.keras``, ``.onnx`` or ``.xml``, or a
    :class:`~imgvec.backbones.modelfile.ModelFileSpec`): it is read, checked and wrapped when the embedder is made
    (:func:`imgvec.runtime.model_files.prepare_model_file`), and runs on OpenVINO on the CPU.
    """

    def __init__(
        self,
        model: str | ModelFileSpec = DEFAULT_BACKBONE,
        weights: str | Weights | None = "imagenet",
        image_size: int | None = None,
        batch_size: int = 32,
        workers: int | None = None,
        seed: int = DEFAULT_SEED,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "auto",
        precision: str = "float32",
        runtime: str = "auto",
        preprocess: str | None = None,
        mean: str | tuple[float, ...] | None = None,
        std: str | tuple[float, ...] | None = None,
        layer: str | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.device = check_choice(param("device"), device, DEVICES)
        self.precision = check_choice(param("precision"), precision, PRECISIONS)
        self.runtime = check_choice(param("runtime"), runtime, RUNTIMES)
        self.model_file: PreparedModel | None = None
        options = {"preprocess": preprocess, "mean": mean, "std": std, "layer": layer}
        if isinstance(model, ModelFileSpec) or is_model_path(model):
            if isinstance(weights, str) and weights.strip().lower() != "imagenet" or (
                    isinstance(weights, Weights) and weights.kind != "model"):
                raise BadInputError(f"{param('weights')} {weights if isinstance(weights, str) else weights.kind}: a "
                                    "model file holds its own weights; leave it out")
            if self.runtime not in ("auto", "openvino") or device == "gpu":
                raise BadInputError(f"a model file runs on OpenVINO on the CPU: leave out {param('runtime')} "
                                    f"{self.runtime}" + (f" and {param('device')} gpu" if device == "gpu" else ""))
            spec = model if isinstance(model, ModelFileSpec) else model_file_spec(str(model), **options)
            self.model_file = prepare_model_file(spec, image_size)
            self.backbone = Backbone(spec.name, "", "", self.model_file.image_size, self.model_file.dim, 0,
                                     spec.preprocess.describe(), min_size=self.model_file.image_size)
            self.weights = Weights("model")
            self.image_size = self.model_file.image_size
        else:
            given = [name for name, value in options.items() if value is not None]
            if given:
                raise BadInputError(f"{', '.join(param(g) for g in given)}: for a model file ({param('model')} PATH); "
                                    f"backbone {model} does its own preprocessing")
            if "/" in str(model) or "." in str(model):
                raise BadInputError(f"{param('model')} {model!r}: neither a backbone (`imgvec models` lists them) nor a "
                                    "model file (a path ending in .keras, .onnx or .xml)")
            self.backbone = get_backbone(model)
            self.weights = resolve_weights(self.backbone, weights if isinstance(weights, Weights)
                                           else parse_weights(weights, seed))
            self.image_size = check_image_size(int(image_size if image_size is not None else self.backbone.input_size),
                                               self.backbone)
        self.batch_size = check_at_least("batch_size", int(batch_size))
        self.workers = int(workers or os.cpu_count() or 1)
        self.max_pixels = int(max_pixels)
        self.calibration = calibration  # int8 only; must be set before load()
        self.engine_: Engine | None = None  # set by load()

    def check_memory(self, available: int | None = None) -> None:
        """Refuse, before the model loads, a batch that cannot fit in this machine's memory; one line saying what fits.

        The estimate is rough on purpose (see :func:`batch_bytes`): it stops ``--image-size 4096``
        from being killed by the kernel after minutes, not a run that fits.
        """
        available = machine_memory() if available is None else available
        needed = batch_bytes(self.batch_size, self.image_size)
        if needed <= available:
            return
        batch = bisect.bisect_right(range(self.batch_size + 1), available, key=lambda n: batch_bytes(n, self.image_size)) - 1
        size = 32 * (bisect.bisect_right(range(self.image_size // 32 + 1), available,
                                         key=lambda s: batch_bytes(self.batch_size, 32 * s)) - 1)
        fits = [f"{param('batch_size')} {batch} at {self.image_size} px" if batch else "",
                f"{param('image_size')} {size} at {param('batch_size')} {self.batch_size}"
                if size >= self.backbone.min_size else ""]
        raise BadInputError(
            f"{param('image_size')} {self.image_size} with {param('batch_size')} {self.batch_size} needs about "
            f"{needed / 2**30:.1f} GiB (the batch as float32 and about {ACTIVATION_BYTES_PER_PIXEL} bytes a pixel of "
            f"the backbone's activations), more than this machine's {available / 2**30:.1f} GiB"
            + (f"; {' or '.join(f for f in fits if f)} fits" if any(fits) else ""))

    @classmethod
    def from_config(cls, config: EmbedConfig) -> "Embedder":
        """The embedder ``config`` asks for (defaults for what it leaves open)."""
        model = config.model or DEFAULT_BACKBONE
        file = isinstance(model, ModelFileSpec) or is_model_path(model)
        return cls(model=model, weights=config.weights if file or config.weights is not None else "imagenet",
                   image_size=config.image_size, seed=config.seed, calibration=config.calibration, **config.running(),
                   **config.model_file_options)

    @property
    def config(self) -> EmbedConfig:
        """This embedder as an :class:`EmbedConfig` (weights resolved; a model file pinned to the bytes read; an int8
        model's calibration): what a Ray worker rebuilds it from."""
        running = dict(batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels,
                       device=self.device, precision=self.precision, runtime=self.runtime, calibration=self.calibration)
        if self.model_file is not None:
            spec = replace(self.model_file.spec, sha256=self.model_file.sha256)
            return EmbedConfig(model=spec, weights=self.weights, image_size=self.image_size, seed=DEFAULT_SEED,
                               **running)
        seed = DEFAULT_SEED if self.weights.seed is None else self.weights.seed
        return EmbedConfig(model=self.backbone.name, weights=self.weights, image_size=self.image_size, seed=seed,
                           **running)

    @classmethod
    def from_provenance(cls, provenance: Provenance, weights_path: str | None = None, model_path: str | None = None,
                        root: str | None = None, **kwargs: Any) -> "Embedder":
        """The embedder that reproduces ``provenance`` (same backbone, weights, size; the same model file).

        Runtime, device and precision are not taken over: they do not change what the rows
        mean. Queries run in float32 unless asked (a mixed-precision store made on a GPU is
        queried on the CPU without a bfloat16 parity check to fail). ``weights_path`` and ``model_path``
        say where a weights file or model file is now, if it moved: its bytes must be the recorded ones.
        int8 is taken over, with its calibration: the rows are the quantized model's. Its model comes from
        the cache, or is quantized again on the recorded images under ``root`` (the store's root) if they
        are unchanged.
        """
        if provenance.precision == "int8":
            if kwargs.get("precision", "int8") != "int8":
                raise MismatchError(f"the embeddings were made with {param('precision')} int8 "
                                    f"({provenance.quantization}); {kwargs['precision']} rows cannot join them")
            kwargs["precision"] = "int8"
            kwargs["calibration"] = Calibration(root or "", tuple(provenance.calibration()),
                                                provenance.calibration_sha256,
                                                kwargs.get("max_pixels", DEFAULT_MAX_PIXELS))
        if provenance.is_model_file:
            return cls._from_model_file(provenance, model_path, kwargs)
        backbone = get_backbone(provenance.backbone)
        if backbone.dim != provenance.dim:
            raise MismatchError(f"the embeddings are recorded as {provenance.dim}-d from {backbone.name}, which makes "
                                f"{backbone.dim}-d ones: the file is damaged or forged")
        weights = provenance.weights_spec
        if weights.kind == "file":
            path = weights_path or weights.path
            if not path or not os.path.isfile(path):
                raise MismatchError(
                    f"the embeddings were made with weights file {weights.path}, which is not "
                    f"there; pass {param('weights')} PATH to the same file (sha256 {weights.sha256})"
                )
            if sha256_file(path) != weights.sha256:
                raise MismatchError(
                    f"weights file {path} is not the one the embeddings were made with "
                    f"(sha256 {weights.sha256})"
                )
            weights = Weights("file", path=os.path.abspath(path), sha256=weights.sha256)
        embedder = cls(model=provenance.backbone, weights=weights, image_size=provenance.input_size, **kwargs)
        if provenance.is_random:
            made, asked = random_init_family(provenance.runtime), random_init_family(embedder.runtime)
            if made != asked:
                raise MismatchError(
                    f"the embeddings were made with random weights drawn by {made}, and seeded random weights "
                    f"differ between Keras backends; use {param('runtime')} {made}"
                    + (" (or openvino)" if made == "tensorflow" else ""))
        return embedder

    @classmethod
    def _from_model_file(cls, prov: Provenance, model_path: str | None, kwargs: dict[str, Any]) -> "Embedder":
        path = os.path.abspath(os.path.expanduser(model_path or str(prov.model_path)))
        recorded = f"{prov.backbone}, sha256 {prov.model_sha256}"
        if not os.path.isfile(path):
            raise MismatchError(f"the embeddings were made with model file {prov.model_path} ({recorded}), and "
                                f"{path} is not there; pass {param('model')} PATH to the same file")
        spec = model_file_spec(path, prov.model_preprocess, layer=prov.model_layer, sha256=str(prov.model_sha256))
        try:
            embedder = cls(model=spec, weights=Weights("model"), image_size=prov.input_size, **kwargs)
        except ModelFileMismatch as changed:
            if path == prov.model_path:
                raise MismatchError(f"model file {path} has changed since the embeddings were made (sha256 "
                                    f"{changed.found[:16]}... now, {changed.expected[:16]}... then); put the "
                                    f"original back, or embed again into a new store") from None
            raise MismatchError(f"model file {path} is not the one the embeddings were made with ({recorded}; "
                                f"this one has sha256 {changed.found[:16]}...)") from None
        if embedder.dim != prov.dim:
            raise MismatchError(f"the embeddings are recorded as {prov.dim}-d from {prov.backbone}, which makes "
                                f"{embedder.dim}-d ones: the file is damaged or forged")
        return embedder

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def model_fields(self) -> dict[str, Any]:
        """The provenance fields of a model file (empty for a registry backbone)."""
        m = self.model_file
        if m is None:
            return {}
        return dict(model_format=m.spec.format, model_path=m.spec.path, model_size=m.source.size,
                    model_sha256=m.sha256, model_preprocess=m.spec.preprocess.spec, model_layer=m.spec.layer,
                    model_input=m.input, model_output=m.output)

    def calibration_fields(self) -> dict[str, Any]:
        """The provenance fields of an int8 model's calibration (empty strings for float precisions)."""
        c = self.calibration if self.precision == "int8" else None
        return dict(calibration_sha256=c.sha256 if c else "", calibration_keys=json.dumps(list(c.keys)) if c else "")

    def key_provenance(self) -> Provenance:
        """Provenance without loading the model (no TensorFlow import): enough for a compatibility check."""
        w = self.weights
        return Provenance(self.backbone.name, w.kind, w.seed, w.path, w.sha256, self.image_size,
                          self.backbone.preprocessing, self.dim, runtime=self.runtime, precision=self.precision,
                          **self.calibration_fields(), **self.model_fields())

    @property
    def model_batch(self) -> int:
        """Images per model call: what the engine prefers, at most the batch."""
        return min(self.batch_size, self.engine.model_batch)

    @property
    def engine(self) -> Engine:
        """The loaded engine (loaded on first use)."""
        return cast(Engine, self.load().engine_)

    def provenance(self) -> Provenance:
        """How this embedder's rows are made; versions of what actually ran (no import just to ask)."""
        engine = self.engine
        return Provenance(
            backbone=self.backbone.name,
            weights=self.weights.kind,
            weights_seed=self.weights.seed,
            weights_path=self.weights.path,
            weights_sha256=self.weights.sha256,
            input_size=self.image_size,
            preprocessing=self.backbone.preprocessing,
            dim=self.dim,
            keras_version=dist_version("keras"),
            tensorflow_version=engine.version if engine.runtime == "tensorflow" else "",
            device=engine.device,
            precision=self.precision,
            runtime=engine.runtime,
            runtime_version=engine.version,
            **self.calibration_fields(),
            **self.model_fields(),
        )

    def load(self) -> "Embedder":
        """Load the engine (idempotent; engines are shared for the life of the process)."""
        if self.engine_ is None and self.model_file is not None:
            self.engine_ = load_model_file_engine(self.runtime, self.model_file, self.precision, self.device,
                                                  self.calibration)
        if self.engine_ is None:
            self.engine_ = load_engine(self.runtime, self.backbone, self.weights, self.image_size,
                                       self.precision, self.device, self.calibration)
        return self

    def check_int8(self, paths: Sequence[str], min_median_cosine: float = INT8_MIN_MEDIAN_COSINE,
                   min_overlap: float = INT8_MIN_OVERLAP, accept: bool = False) -> Int8Check:
        """Measure what int8 changes on ``paths`` (decoded as embedding decodes them): per-row cosine to
        float32 and the overlap of each image's top-10 neighbours within the sample. Below either
        threshold, refuse with one line (unless ``accept``)."""
        self.load()
        decoded = [d[0] for d in map(self._decode, paths) if not isinstance(d, ImageSkipped)]  # pixels, not stats
        if not decoded:
            raise BadInputError(f"none of the {len(paths)} images picked to check int8 decodes")
        pixels = np.stack(decoded)
        int8 = self._run(pixels)
        reference = (load_model_file_engine(self.runtime, self.model_file, "float32", self.device)
                     if self.model_file is not None else
                     load_engine(self.runtime, self.backbone, self.weights, self.image_size, "float32", self.device))
        f32 = np.concatenate([reference(pixels[i : i + self.model_batch]) for i in range(0, len(pixels), self.model_batch)])
        cos = np.nan_to_num(row_cosines(int8, f32), nan=-1.0)
        k = min(INT8_NEIGHBOURS, len(pixels) - 1)
        check = Int8Check(len(pixels), float(np.median(cos)), float(cos.min()),
                          neighbour_overlap(f32, int8, k) if k > 0 else 1.0, k)
        if not accept and (check.median_cosine < min_median_cosine or check.overlap < min_overlap):
            raise BadInputError(
                f"{param('precision')} int8 changes {self.backbone.name}'s embeddings too much: {check.describe()} "
                f"(needs median cosine >= {min_median_cosine} and overlap >= {min_overlap}); use "
                f"{param('precision')} float32, or {param('accept_int8')} to write the store anyway")
        return check

    def embed_arrays(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a ``(n, size, size, 3)`` uint8 batch; returns ``(n, dim)`` float32."""
        self.load()
        pixels = np.asarray(pixels)
        expected = (self.image_size, self.image_size, 3)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise BadInputError(f"expected images of shape (n, {', '.join(map(str, expected))}), got {pixels.shape}")
        return self._run(pixels.astype(np.uint8, copy=False))

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        """The model on uint8 ``pixels``, :attr:`model_batch` images per call; (n, dim) float32."""
        out = np.empty((len(pixels), self.dim), np.float32)
        step = self.model_batch
        for i in range(0, len(pixels), step):
            out[i : i + step] = self.engine_(pixels[i : i + step])  # type: ignore[misc]
        return out

    def _decode(self, path: str) -> tuple[np.ndarray, np.ndarray] | ImageSkipped:
        """The model's pixels and the image's statistics (images.pixel_stats), or why it was skipped."""
        try:
            return load_image_stats(path, self.image_size, self.max_pixels)  # type: ignore[return-value]
        except ImageSkipped as skipped:
            return skipped

    def embed_files(self, paths: Sequence[str], prefetch: int = 2) -> Iterator[EmbeddedBatch]:
        """Embed ``paths`` batch by batch; bad files come back in ``skipped``, never raised.

        At most ``prefetch + 1`` batches of decoded pixels are held at once, so memory does
        not grow with the number of files. With no paths the model is not even loaded.
        """
        if not paths:
            return
        self.load()
        bs = self.batch_size
        starts = range(0, len(paths), bs)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="imgvec-decode") as pool:
            pending: deque[tuple[int, list[Future[Any]]]] = deque()
            upcoming = iter(starts)

            def submit_next() -> None:
                start = next(upcoming, None)
                if start is not None:
                    pending.append((start, [pool.submit(self._decode, p) for p in paths[start : start + bs]]))

            for _ in range(prefetch + 1):
                submit_next()
            while pending:
                start, futures = pending.popleft()
                submit_next()
                decoded = [f.result() for f in futures]
                ok = [i for i, item in enumerate(decoded) if not isinstance(item, ImageSkipped)]
                skipped = [item for item in decoded if isinstance(item, ImageSkipped)]
                emb = self._run(np.stack([decoded[i][0] for i in ok])) if ok else np.zeros((0, self.dim), np.float32)
                stats = (np.stack([decoded[i][1] for i in ok]) if ok
                         else np.zeros((0, len(STATS_COLUMNS)), np.float32))
                yield EmbeddedBatch(np.asarray(ok, dtype=np.int64) + start, emb, skipped, stats)
