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
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from imgvec.backbones.registry import DEFAULT_BACKBONE, DEFAULT_SEED, Weights, get_backbone, parse_weights
from imgvec.checks import check_choice, check_image_size
from imgvec.fileio import sha256_file
from imgvec.backbones.device import DEVICES, PRECISIONS
from imgvec.errors import BadInputError, ImageSkipped, MismatchError, param
from imgvec.files.images import DEFAULT_MAX_PIXELS, load_image
from imgvec.files.provenance import Provenance, random_init_family
from imgvec.runtime.loader import RUNTIMES, Calibration, Engine, dist_version, load_engine, row_cosines

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


@dataclass(frozen=True)
class EmbedConfig:
    """How images become rows and how the model runs: one value, made once (by the CLI or a notebook)
    and passed unchanged through the api and ingest to the :class:`Embedder` and to Ray workers.

    ``model``, ``weights``, ``image_size`` and ``precision`` left as None mean: the store's own when
    a store is resumed, else efficientnetb0, ImageNet weights, the backbone's input size and float32.
    """

    model: str | None = None
    weights: str | Weights | None = None  # imagenet, none (random, ``seed``), a weights file
    image_size: int | None = None
    seed: int = DEFAULT_SEED
    batch_size: int = 32
    workers: int | None = None  # decoding threads (default: the CPU count)
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    precision: str | None = None
    runtime: str = "auto"
    calibration: Calibration | None = None  # int8: the images it is quantized on (chosen from the folder if None)

    @property
    def chooses_embedding(self) -> bool:
        """Whether it says what the rows mean (backbone, weights, size), not only how to run."""
        return (self.model, self.weights, self.image_size) != (None, None, None)

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
    """

    def __init__(
        self,
        model: str = DEFAULT_BACKBONE,
        weights: str | Weights | None = "imagenet",
        image_size: int | None = None,
        batch_size: int = 32,
        workers: int | None = None,
        seed: int = DEFAULT_SEED,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "auto",
        precision: str = "float32",
        runtime: str = "auto",
        calibration: Calibration | None = None,
    ) -> None:
        self.backbone = get_backbone(model)
        self.device = check_choice(param("device"), device, DEVICES)
        self.precision = check_choice(param("precision"), precision, PRECISIONS)
        self.runtime = check_choice(param("runtime"), runtime, RUNTIMES)
        self.weights = weights if isinstance(weights, Weights) else parse_weights(weights, seed)
        self.image_size = check_image_size(int(image_size if image_size is not None else self.backbone.input_size),
                                           self.backbone)
        if batch_size < 1:
            raise BadInputError(f"{param('batch_size')} must be at least 1, not {batch_size}")
        self.batch_size = int(batch_size)
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
        return cls(config.model or DEFAULT_BACKBONE, "imagenet" if config.weights is None else config.weights,
                   config.image_size, seed=config.seed, calibration=config.calibration, **config.running())

    @property
    def config(self) -> EmbedConfig:
        """This embedder as an :class:`EmbedConfig` (weights resolved): what a Ray worker rebuilds it from."""
        return EmbedConfig(self.backbone.name, self.weights, self.image_size, DEFAULT_SEED if self.weights.seed is None else self.weights.seed,
                           self.batch_size, self.workers, self.max_pixels, self.device, self.precision, self.runtime,
                           self.calibration)

    @classmethod
    def from_provenance(cls, provenance: Provenance, weights_path: str | None = None, root: str | None = None,
                        **kwargs: Any) -> "Embedder":
        """The embedder that reproduces ``provenance`` (same backbone, weights, size).

        Runtime, device and precision are not taken over: they do not change what the rows
        mean. Queries run in float32 unless asked (a mixed-precision store made on a GPU is
        queried on the CPU without a bfloat16 parity check to fail). int8 is taken over, with its
        calibration: the rows are the quantized model's. Its model comes from the cache, or is
        quantized again on the recorded images under ``root`` (the store's root) if they are unchanged.
        """
        if provenance.precision == "int8":
            if kwargs.get("precision", "int8") != "int8":
                raise MismatchError(f"the embeddings were made with {param('precision')} int8 "
                                    f"({provenance.quantization}); {kwargs['precision']} rows cannot join them")
            kwargs["precision"] = "int8"
            kwargs["calibration"] = Calibration(root or "", tuple(provenance.calibration()),
                                                provenance.calibration_sha256,
                                                kwargs.get("max_pixels", DEFAULT_MAX_PIXELS))
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

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def model_batch(self) -> int:
        """Images per model call: what the engine prefers, at most the batch."""
        return min(self.batch_size, self.load().engine_.model_batch)  # type: ignore[union-attr]

    def provenance(self) -> Provenance:
        """How this embedder's rows are made; versions of what actually ran (no import just to ask)."""
        engine = self.load().engine_
        assert engine is not None
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
            calibration_sha256=self.calibration.sha256 if self.precision == "int8" and self.calibration else "",
            calibration_keys=json.dumps(list(self.calibration.keys))
            if self.precision == "int8" and self.calibration else "",
        )

    def load(self) -> "Embedder":
        """Load the engine (idempotent; engines are shared for the life of the process)."""
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
        decoded = [d for d in map(self._decode, paths) if not isinstance(d, ImageSkipped)]
        if not decoded:
            raise BadInputError(f"none of the {len(paths)} images picked to check int8 decodes")
        pixels = np.stack(decoded)
        int8 = self._run(pixels)
        reference = load_engine(self.runtime, self.backbone, self.weights, self.image_size, "float32", self.device)
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

    def _decode(self, path: str) -> np.ndarray | ImageSkipped:
        try:
            return load_image(path, self.image_size, self.max_pixels)
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
                emb = self._run(np.stack([decoded[i] for i in ok])) if ok else np.zeros((0, self.dim), np.float32)
                yield EmbeddedBatch(np.asarray(ok, dtype=np.int64) + start, emb, skipped)
