"""Folders of images -> a store: the embed run (create or resume, sync), below the api.

:func:`embed` is ``imgvec.embed``; the backbone comparison uses it too, which is why it lives
here rather than in api.py (the analyses never import the api).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from .backbones import DEFAULT_BACKBONE, DEFAULT_SEED
from .distributed import ENGINES, embed_files_on_ray
from .embedder import Embedder
from .errors import BadInputError, param
from .fileio import check_output
from .images import DEFAULT_MAX_PIXELS, find_images, is_image_name
from .progress import Phase, Progress
from .provenance import Provenance, check_compatible
from .results import EmbedSummary
from .journal import journal_path
from .store import StoreWriter, open_store

PathLike = str | os.PathLike[str]


def embed(
    sources: Sequence[PathLike],
    output: PathLike,
    model: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    seed: int = DEFAULT_SEED,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    sync: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    runtime: str = "auto",
    progress: Progress | None = None,
) -> EmbedSummary:
    """Embed every image under ``sources`` into the store ``output``.

    A new store is created; an existing one is resumed: images already in it are kept and
    not recomputed, only new ones are embedded. With ``sync``, rows whose files are no
    longer under ``sources`` are removed. Options left as ``None`` are taken from the
    existing store (or default to efficientnetb0 with ImageNet weights for a new one).
    Interrupting (Ctrl-C, kill) loses at most the batch under way: run again to go on.
    ``device`` (auto/cpu/gpu) and ``precision`` (float32/mixed; default: the store's, else
    float32) and ``runtime`` (auto/openvino/tensorflow/jax/torch; see :mod:`imgvec.runtime`) say how
    the model runs; a store made with one runtime can be extended with another. ``engine="ray"``
    embeds on a Ray cluster (``ray_address``, else RAY_ADDRESS, else a local one) with
    ``ray_workers`` actors; this process still writes the store. ``progress`` is told the
    phases ``loading <backbone>`` and ``embedding with <backbone>`` (:mod:`imgvec.progress`).
    """
    if engine not in ENGINES:
        raise BadInputError(f"{param('engine')} {engine!r}: expected one of {', '.join(ENGINES)}")
    for option, value in (("workers", workers), ("ray_workers", ray_workers), ("max_pixels", max_pixels)):
        if value is not None and value < 1:
            raise BadInputError(f"{param(option)} must be at least 1, not {value}")
    output = check_output(output, sources, read_under=is_image_name)  # before finding images or loading a model
    start = time.perf_counter()
    writer: StoreWriter | None = None
    created = False  # a store this run made stays only once it holds a row
    build_seconds = 0.0
    try:
        if output.exists():
            writer = StoreWriter(output)
            run = dict(batch_size=batch_size, workers=workers, max_pixels=max_pixels, device=device,
                       precision=precision or writer.provenance.precision, runtime=runtime)
            embedder = _embedder_for_store(writer, model, weights, image_size, seed, run)
            collection = find_images(sources, root=writer.root)  # the model loads only if there is work
            if engine == "local":
                embedder.check_memory()
        else:
            embedder = Embedder(model or DEFAULT_BACKBONE, weights, image_size, batch_size, workers, seed, max_pixels,
                                device=device, precision=precision or "float32", runtime=runtime)
            collection = find_images(sources)
            if engine == "local":
                embedder.check_memory()  # --image-size 4096: one line now, not the kernel's OOM killer later
            built_from = time.perf_counter()
            with Phase(progress, f"loading {embedder.backbone.name}", 1):
                embedder.load()  # before creating a store: missing weights must not leave an empty file
            build_seconds = time.perf_counter() - built_from
            writer = StoreWriter(output, embedder.provenance(), collection.root)
            created = True
        before = len(writer.keys)
        todo = [f for f in collection.files if f.key not in writer.keys]
        if todo and engine == "local" and embedder.engine_ is None:  # timed apart from the throughput
            built_from = time.perf_counter()
            with Phase(progress, f"loading {embedder.backbone.name}", 1):
                embedder.load()
            build_seconds = time.perf_counter() - built_from
        removed = writer.keys - {f.key for f in collection.files} if sync else set()
        key_of = {f.path: f.key for f in todo}
        skipped: list[tuple[str, str]] = []
        finished = 0
        paths = list(key_of)
        embed_start = time.perf_counter()
        batches = (embedder.embed_files(paths) if engine == "local"
                   else embed_files_on_ray(embedder, paths, ray_address, ray_workers))
        with Phase(progress, f"embedding with {embedder.backbone.name}", len(todo)) as step:
            for batch in batches:
                rows = [todo[i] for i in batch.indices]
                skips = [(key_of[s.path], s.reason) for s in batch.skipped]
                writer.append(batch.embeddings, [f.key for f in rows], [f.label for f in rows], skips)
                skipped.extend(skips)
                finished += len(batch.indices) + len(batch.skipped)
                step.update(finished)
        writer.commit(drop=removed)
        created = False
        return EmbedSummary(output, writer.provenance, len(writer.keys) - before + len(removed),
                            len(collection.files) - len(todo), len(writer.keys), skipped,
                            time.perf_counter() - start, len(removed), build_seconds,
                            time.perf_counter() - embed_start)
    except KeyboardInterrupt as interrupt:  # say what is kept: a KeyboardInterrupt still, for notebooks too
        stored = _close(writer, created) if writer is not None else 0
        writer = None
        interrupt.args = (f"{stored} rows are safely stored in {output}; running the same command again resumes "
                          "from there" if stored else "nothing was stored yet",)
        raise
    finally:
        if writer is not None:
            _close(writer, created)  # on an error or Ctrl-C, what was embedded is still committed


def _close(writer: StoreWriter, created: bool) -> int:
    """Commit and close ``writer``; the rows stored. A store this run created that holds no row is removed."""
    writer.close()
    with open_store(writer.path) as stored:  # the journal may have held a batch the writer had not counted yet
        rows = stored.rows
    if created and not rows:
        for leftover in (writer.path, journal_path(writer.path)):
            leftover.unlink(missing_ok=True)
    return rows


def _embedder_for_store(store: StoreWriter, model: str | None, weights: str | None, image_size: int | None,
                        seed: int, kwargs: dict[str, Any]) -> Embedder:
    """The store's own embedder; explicit options must agree with how the store was made."""
    if model is None and weights is None and image_size is None:
        return Embedder.from_provenance(store.provenance, **kwargs)
    prov = store.provenance
    asked = Embedder(model or prov.backbone, weights if weights is not None else weights_arg(prov),
                     image_size if image_size is not None else prov.input_size, seed=seed, **kwargs)
    check_compatible(prov, _key_provenance(asked), f"store {store.path}", "the requested embedding",
                     fix=f"leave out {param('model')}/{param('weights')}/{param('image_size')} to resume with the store's "
                         "own, or write a new store")
    return asked


def weights_arg(prov: Provenance) -> str:
    """The --weights value that reproduces ``prov``'s weights."""
    return prov.weights_path if prov.weights == "file" else ("none" if prov.weights == "random" else "imagenet")


def _key_provenance(embedder: Embedder) -> Provenance:
    """Provenance without importing TensorFlow: enough for a compatibility check."""
    w = embedder.weights
    return Provenance(embedder.backbone.name, w.kind, w.seed, w.path, w.sha256, embedder.image_size,
                      embedder.backbone.preprocessing, embedder.dim, runtime=embedder.runtime)
