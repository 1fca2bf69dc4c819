"""Folders of images -> a store: the embed run (create or resume, sync), below the api.

:func:`embed` is ``imgvec.embed``; the backbone comparison uses it too, which is why it lives
here rather than in api.py (the analyses never import the api). A run is three steps: plan
(open or create the store, find what is new), run (embed the new images, locally or on Ray,
appending each batch), summarise.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from imgvec.checks import check_at_least, check_choice
from imgvec.embedding.distributed import ENGINES, embed_files_on_ray
from imgvec.embedding import embedder as embedder_module
from imgvec.embedding.embedder import (INT8_MIN_MEDIAN_COSINE, INT8_MIN_OVERLAP, EmbeddedBatch, EmbedConfig, Embedder,
                                       Int8Check, calibration_sample, check_sample)
from imgvec.backbones.modelfile import ModelFileSpec, is_model_path
from imgvec.errors import BadInputError, MismatchError, param
from imgvec.fileio import check_output
from imgvec.files.images import Collection, ImageFile, find_images, is_image_name
from imgvec.runtime.loader import Calibration, RuntimeNote
from imgvec.progress import Phase, Progress
from imgvec.files.provenance import Provenance, check_compatible
from imgvec.results import EmbedSummary
from imgvec.files.journal import journal_path
from imgvec.vectors.store import StoreWriter, open_store

PathLike = str | os.PathLike[str]


@dataclass
class _Plan:
    """What one embed run does: the store it writes, the embedder, the images to embed, the rows to drop."""

    writer: StoreWriter
    embedder: Embedder
    todo: list[ImageFile]
    already: int  # images found that the store already has
    removed: set[str]  # keys dropped by ``sync``
    build_seconds: float = 0.0
    created: bool = False  # a store this run made stays only once it holds a row
    int8_check: Int8Check | None = None  # a new int8 store: what int8 changed against float32


def embed(
    sources: Sequence[PathLike],
    output: PathLike,
    config: EmbedConfig | None = None,
    *,
    sync: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    progress: Progress | None = None,
    accept_int8: bool = False,
    int8_thresholds: tuple[float, float] | None = None,
    **settings: Any,
) -> EmbedSummary:
    """Embed every image under ``sources`` into the store ``output``.

    ``config`` (an :class:`~imgvec.embedding.embedder.EmbedConfig`) says how; any of its fields may also
    be given by name (``model="resnet50", image_size=224``) and override it. A new store is
    created; an existing one is resumed: images already in it are kept and not recomputed, only
    new ones are embedded. With ``sync``, rows whose files are no longer under ``sources`` are
    removed. ``model``/``weights``/``image_size`` left as None are taken from the existing store
    (or default to efficientnetlite0 with ImageNet weights for a new one); ``precision`` too. A store
    made with one runtime can be extended with another. Interrupting (Ctrl-C, kill) loses at most
    the batch under way: run again to go on. ``engine="ray"`` embeds on a Ray cluster
    (``ray_address``, else RAY_ADDRESS, else a local one) with ``ray_workers`` actors; this
    process still writes the store. ``progress`` is told the phases ``loading <backbone>`` and
    ``embedding with <backbone>`` (:mod:`imgvec.progress`).

    ``precision="int8"`` (OpenVINO) quantizes the model on up to 100 of the images found (cached), and
    for a new store first measures on up to 200 others what it changes against float32: below
    ``int8_thresholds`` (median cosine, top-10 neighbour overlap; default 0.98 and 0.9) it refuses and writes nothing, unless
    ``accept_int8``. The figures come back as a :class:`RuntimeNote` either way. A resumed int8 store keeps
    its own calibration; int8 rows never join float ones.
    """
    config = replace(config or EmbedConfig(), **settings)
    _check_run(config, engine, ray_workers)
    output = check_output(output, sources, read_under=is_image_name)  # before finding images or loading a model
    start = time.perf_counter()
    local = engine == "local"
    plan: _Plan | None = None
    try:
        thresholds = int8_thresholds or (embedder_module.INT8_MIN_MEDIAN_COSINE, embedder_module.INT8_MIN_OVERLAP)
        plan = _plan(sources, output, config, sync, check_memory=local, progress=progress,
                     int8=(accept_int8, *thresholds))
        if plan.todo and local and plan.embedder.engine_ is None:  # timed apart from the throughput
            plan.build_seconds = _timed_load(plan.embedder, progress)
        embed_start = time.perf_counter()
        skipped = _run(plan, engine, ray_address, ray_workers, progress)
        plan.writer.commit(drop=plan.removed)
        plan.created = False
        return _summary(plan, output, skipped, time.perf_counter() - start, time.perf_counter() - embed_start)
    except KeyboardInterrupt as interrupt:  # say what is kept: a KeyboardInterrupt still, for notebooks too
        stored = _close(plan.writer, plan.created) if plan is not None else 0
        plan = None
        interrupt.args = (f"{stored} rows are safely stored in {output}; running the same command again resumes "
                          "from there" if stored else "nothing was stored yet",)
        raise
    finally:
        if plan is not None:
            _close(plan.writer, plan.created)  # on an error or Ctrl-C, what was embedded is still committed


def _close(writer: StoreWriter, created: bool) -> int:
    """Commit and close ``writer``; the rows stored. A store this run created that holds no row is removed."""
    writer.close()
    with open_store(writer.path) as stored:  # the journal may have held a batch the writer had not counted yet
        rows = stored.rows
    if created and not rows:
        for leftover in (writer.path, journal_path(writer.path)):
            leftover.unlink(missing_ok=True)
    return rows


def _check_run(config: EmbedConfig, engine: str, ray_workers: int | None) -> None:
    check_choice(param("engine"), engine, ENGINES)
    for option, value in (("workers", config.workers), ("ray_workers", ray_workers), ("max_pixels", config.max_pixels)):
        if value is not None:
            check_at_least(option, value)


def _plan(sources: Sequence[PathLike], output: os.PathLike[str], config: EmbedConfig, sync: bool,
          check_memory: bool, progress: Progress | None = None,
          int8: tuple[bool, float, float] = (False, INT8_MIN_MEDIAN_COSINE, INT8_MIN_OVERLAP)) -> _Plan:
    """Open (or create) the store and list the images it does not have yet.

    A new store is created only after the model loaded: missing weights must not leave an empty
    file. A resumed store's model loads later, and only if there is work. ``check_memory``: refuse
    a batch that cannot fit in memory before any model loads (``--image-size 4096``: one line, not
    the kernel's OOM killer later).
    """
    build_seconds = 0.0
    if os.path.exists(output):
        writer = StoreWriter(output)
        try:
            embedder = _embedder_for_store(writer, config)
            collection = find_images(sources, root=writer.root)
            if check_memory:
                embedder.check_memory()
        except BaseException:
            writer.close()
            raise
        created = False
    else:
        started = time.perf_counter()
        model = config.model
        file = isinstance(model, ModelFileSpec) or is_model_path(model)
        # A model file is read, checked and (a .keras file, once) converted as its embedder is made: say so.
        with Phase(progress, f"loading {os.path.basename(str(getattr(model, 'path', model)))}", int(file)):
            embedder = Embedder.from_config(config)
        reading = time.perf_counter() - started if file else 0.0
        collection = find_images(sources)
        if check_memory:
            embedder.check_memory()
        if embedder.precision == "int8" and embedder.calibration is None:
            embedder.calibration = _calibration(collection, embedder.max_pixels)
        build_seconds = reading + _timed_load(embedder, progress)
        int8_check = None
        if embedder.precision == "int8":  # counted with the build: a one-time cost, like the quantization
            started = time.perf_counter()
            with Phase(progress, "checking int8 against float32", 1):
                int8_check = _check_int8(embedder, collection, *int8)
            build_seconds += time.perf_counter() - started
        writer = StoreWriter(output, embedder.provenance(), collection.root)
        created = True
    todo = [f for f in collection.files if f.key not in writer.keys]
    removed = writer.keys - {f.key for f in collection.files} if sync else set()
    return _Plan(writer, embedder, todo, len(collection.files) - len(todo), removed, build_seconds, created,
                 int8_check if created else None)


def _calibration(collection: Collection, max_pixels: int) -> Calibration:
    """The int8 calibration on up to 100 of the images found (evenly spread over their sorted keys)."""
    if not collection.files:
        raise BadInputError(f"{param('precision')} int8 is calibrated on the images being embedded, and none were found")
    keys = calibration_sample([f.key for f in collection.files])
    return Calibration.of(collection.root, keys, max_pixels)


def _check_int8(embedder: Embedder, collection: Collection, accept: bool, min_cosine: float,
                min_overlap: float) -> Int8Check:
    """int8 against float32 on a sample of the images (refused below the thresholds unless ``accept``); the
    figures as a :class:`RuntimeNote`."""
    assert embedder.calibration is not None
    by_key = {f.key: f.path for f in collection.files}
    sample = check_sample(list(by_key), embedder.calibration.keys)
    check = embedder.check_int8([by_key[k] for k in sample], min_cosine, min_overlap, accept)
    import warnings

    warnings.warn(f"int8 {embedder.backbone.name}, calibrated on {len(embedder.calibration.keys)} of your images, "
                  f"checked against float32: {check.describe()}", RuntimeNote, stacklevel=3)
    return check


def _timed_load(embedder: Embedder, progress: Progress | None = None) -> float:
    """Load the model as the phase ``loading <backbone>``; the seconds it took."""
    started = time.perf_counter()
    with Phase(progress, f"loading {embedder.backbone.name}", 1):
        embedder.load()
    return time.perf_counter() - started


def _run(plan: _Plan, engine: str, ray_address: str | None, ray_workers: int | None,
         progress: Progress | None) -> list[tuple[str, str]]:
    """Embed the plan's images batch by batch, appending each to the store; the skipped files with reasons."""
    key_of = {f.path: f.key for f in plan.todo}
    paths = list(key_of)
    batches: Iterator[EmbeddedBatch] = (plan.embedder.embed_files(paths) if engine == "local"
                                        else embed_files_on_ray(plan.embedder, paths, ray_address, ray_workers))
    skipped: list[tuple[str, str]] = []
    finished = 0
    with Phase(progress, f"embedding with {plan.embedder.backbone.name}", len(plan.todo)) as step:
        for batch in batches:
            rows = [plan.todo[i] for i in batch.indices]
            skips = [(key_of[s.path], s.reason) for s in batch.skipped]
            plan.writer.append(batch.embeddings, [f.key for f in rows], [f.label for f in rows], skips,
                               stats=batch.stats)
            skipped.extend(skips)
            finished += len(batch.indices) + len(batch.skipped)
            step.update(finished)
    return skipped


def _summary(plan: _Plan, output: os.PathLike[str], skipped: list[tuple[str, str]], seconds: float,
             embed_seconds: float) -> EmbedSummary:
    writer = plan.writer
    added = len(plan.todo) - len(skipped)
    return EmbedSummary(output, writer.provenance, added, plan.already, len(writer.keys), skipped, seconds,
                        len(plan.removed), plan.build_seconds, embed_seconds)


def _embedder_for_store(store: StoreWriter, config: EmbedConfig) -> Embedder:
    """The store's own embedder; explicit model/weights/size must agree with how the store was made."""
    prov = store.provenance
    if config.precision is not None and (config.precision == "int8") != (prov.precision == "int8"):
        asked = replace(prov, precision=config.precision, calibration_sha256="", calibration_keys="")
        check_compatible(prov, asked, f"store {store.path}", "the requested embedding",
                         fix=f"leave out {param('precision')} to resume with the store's own, or write a new store")
    config = replace(config, precision=config.precision or prov.precision)
    if not config.chooses_embedding:
        return Embedder.from_provenance(prov, root=store.root, **config.running())
    model = config.model or (prov.model_path if prov.is_model_file else prov.backbone)
    file = isinstance(model, ModelFileSpec) or is_model_path(model)
    if file and prov.is_model_file and not isinstance(model, ModelFileSpec):  # what was stated, unless restated
        own = config.preprocess is None and config.mean is None and config.std is None
        config = replace(config, preprocess=prov.model_preprocess if own else config.preprocess,
                         layer=prov.model_layer if config.layer is None else config.layer)
    asked = Embedder.from_config(replace(
        config, model=model,
        calibration=Calibration(str(store.root), tuple(prov.calibration()), prov.calibration_sha256, config.max_pixels)
        if prov.precision == "int8" else None,
        image_size=prov.input_size if config.image_size is None else config.image_size,
        weights=config.weights if config.weights is not None or file else weights_arg(prov)))
    found = _key_provenance(asked)
    if prov.is_model_file and found.is_model_file and found.model_path == prov.model_path and (
            found.model_sha256 != prov.model_sha256):
        raise MismatchError(f"model file {prov.model_path} has changed since store {store.path} was made (sha256 "
                            f"{str(found.model_sha256)[:16]}... now, {str(prov.model_sha256)[:16]}... then); put the "
                            "original back, or write a new store")
    check_compatible(prov, found, f"store {store.path}", "the requested embedding",
                     fix=f"leave out {param('model')}/{param('weights')}/{param('image_size')} to resume with the store's "
                         "own, or write a new store")
    return asked


def weights_arg(prov: Provenance) -> str:
    """The --weights value that reproduces ``prov``'s weights (a model file's are inside it: imagenet stands for
    "the model's own")."""
    return prov.weights_path if prov.weights == "file" else ("none" if prov.weights == "random" else "imagenet")


def _key_provenance(embedder: Embedder) -> Provenance:
    """Provenance without importing TensorFlow: enough for a compatibility check."""
    return embedder.key_provenance()
