"""Turning image files into embeddings with one backbone.

Files are decoded by a thread pool (Pillow releases the GIL while it decodes and resizes)
a few batches ahead of the model, so decoding overlaps inference. The model runs inside one
traced ``tf.function`` that takes uint8 pixels and does the backbone's own
``preprocess_input`` itself.

On the CPU each batch goes through the model :data:`CPU_MODEL_BATCH` images at a time:
calls of 8-32 images run at the same speed per image, smaller ones are 10-40% slower, and
larger ones only hold more activations in memory (measured in ``benchmarks/bench_embed.py``).
On a GPU the whole batch is one call. ``batch_size`` sets how many images are decoded,
yielded and stored together; results are the same either way.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backbones import DEFAULT_BACKBONE, DEFAULT_SEED, Weights, build_model, get_backbone, parse_weights, sha256_of
from .device import DEVICES, PRECISIONS, check_choice, import_keras, import_tensorflow, precision_policy, select_device
from .errors import BadInputError, ImageSkipped, MismatchError
from .images import DEFAULT_MAX_PIXELS, load_image
from .provenance import Provenance

# Images per model call on the CPU (at most ``batch_size``); see the module docstring.
CPU_MODEL_BATCH = 16


@dataclass
class EmbeddedBatch:
    """One model call's worth of results, in input order."""

    indices: np.ndarray  # positions in the input sequence of the rows below
    embeddings: np.ndarray  # float32, len(indices) x dim
    skipped: list[ImageSkipped] = field(default_factory=list)


class Embedder:
    """Embeds images with a headless keras.applications backbone.

    Parameters are checked when the embedder is made; the model itself is built on first
    use (or by :meth:`load`), since that imports TensorFlow and may fetch weights.
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
    ) -> None:
        self.backbone = get_backbone(model)
        self.device = check_choice("--device", device, DEVICES)
        self.precision = check_choice("--precision", precision, PRECISIONS)
        self.device_: str | None = None  # the TensorFlow device chosen by load()
        self.weights = weights if isinstance(weights, Weights) else parse_weights(weights, seed)
        self.image_size = int(image_size or self.backbone.input_size)
        if self.image_size < self.backbone.min_size:
            raise BadInputError(
                f"--image-size {self.image_size} is too small for {self.backbone.name} "
                f"(at least {self.backbone.min_size})"
            )
        if batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, not {batch_size}")
        self.batch_size = int(batch_size)
        self.workers = int(workers or os.cpu_count() or 1)
        self.max_pixels = int(max_pixels)
        self.model_: Any = None
        self._fn: Callable[[np.ndarray], Any] | None = None

    @classmethod
    def from_provenance(cls, provenance: Provenance, weights_path: str | None = None, **kwargs: Any) -> "Embedder":
        """The embedder that reproduces ``provenance`` exactly (same backbone, weights, size)."""
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
                    f"there; pass --weights PATH to the same file (sha256 {weights.sha256})"
                )
            if sha256_of(path) != weights.sha256:
                raise MismatchError(
                    f"weights file {path} is not the one the embeddings were made with "
                    f"(sha256 {weights.sha256})"
                )
            weights = Weights("file", path=os.path.abspath(path), sha256=weights.sha256)
        kwargs.setdefault("precision", provenance.precision)
        return cls(model=provenance.backbone, weights=weights, image_size=provenance.input_size, **kwargs)

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def model_batch(self) -> int:
        """Images per model call: the whole batch on a GPU, at most CPU_MODEL_BATCH otherwise."""
        on_gpu = (self.device_ or "").startswith("/GPU")
        return self.batch_size if on_gpu else min(self.batch_size, CPU_MODEL_BATCH)

    def provenance(self) -> Provenance:
        tf, keras = import_tensorflow(), import_keras()
        return Provenance(
            backbone=self.backbone.name,
            weights=self.weights.kind,
            weights_seed=self.weights.seed,
            weights_path=self.weights.path,
            weights_sha256=self.weights.sha256,
            input_size=self.image_size,
            preprocessing=self.backbone.preprocessing,
            dim=self.dim,
            keras_version=keras.__version__,
            tensorflow_version=tf.__version__,
            device="gpu" if (self.device_ or select_device(self.device)).startswith("/GPU") else "cpu",
            precision=self.precision,
        )

    def load(self) -> "Embedder":
        """Build the model and trace the inference function (idempotent)."""
        if self._fn is not None:
            return self
        tf = import_tensorflow()
        device = select_device(self.device)
        with tf.device(device), precision_policy(self.precision):
            model = build_model(self.backbone, self.weights, self.image_size)
        preprocess = self.backbone.preprocess_input()
        size = self.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def infer(pixels: Any) -> Any:
            with tf.device(device):
                # Under mixed precision the model computes in float16; embeddings leave as float32.
                return tf.cast(model(preprocess(tf.cast(pixels, tf.float32)), training=False), tf.float32)

        self.device_ = device
        self.model_ = model
        self._fn = infer
        return self

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
            out[i : i + step] = self._fn(pixels[i : i + step])  # type: ignore[misc]
        if self.precision == "mixed":
            self._check_float16_range(out)
        return out

    def _check_float16_range(self, out: np.ndarray) -> None:
        """Refuse what float16 compute cannot represent instead of storing garbage rows."""
        fix = "use --precision float32"
        if not np.isfinite(out).all():
            raise BadInputError(f"{self.backbone.name} overflowed float16 under --precision mixed; {fix}")
        if len(out) and not out.any():
            raise BadInputError(f"{self.backbone.name} gave all-zero embeddings under --precision mixed "
                                f"(activations below float16's range; seen with random weights); {fix}")

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
