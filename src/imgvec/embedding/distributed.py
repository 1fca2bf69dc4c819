"""Embedding on a Ray cluster: the same batches as :meth:`Embedder.embed_files`, made by actors.

The file list is cut into blocks; a pool of actors, each holding one model loaded once,
embeds the blocks; the driver receives the results in order and remains the only writer of
the store, so resume and exactly-once work as in a local run. Workers open images by path:
the files must be at the same paths on every node (a shared filesystem, or copies). A path a
worker cannot read is reported as skipped, like any unreadable file. An OpenVINO model is
converted once by the driver, before the actors start; each actor loads it from the cache
(on other nodes, the cache folder IMGVEC_CACHE_DIR should be shared, or each node converts once).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Iterator, Sequence

import numpy as np

from imgvec.embedding.embedder import EmbedConfig, EmbeddedBatch, Embedder
from imgvec.errors import BadInputError, ImageSkipped, param
from imgvec.runtime.loader import prepare

ENGINES = ("local", "ray")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInputError(f"{param('engine')} ray needs Ray: pip install 'imgvec[ray]'") from None
    return ray


def connect(address: str | None = None) -> Any:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), or start a local one if neither is set."""
    ray = _ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as error:
            raise BadInputError(f"cannot reach the Ray cluster at {address}: {error}") from None
    return ray


class _Worker:
    """A Ray actor holding one loaded model (wrapped by ``ray.remote`` in :func:`embed_files_on_ray`)."""

    def __init__(self, config: EmbedConfig) -> None:
        self.embedder = Embedder.from_config(config).load()

    def embed(self, paths: list[str]) -> list[tuple[np.ndarray, np.ndarray, list[tuple[str, str]], Any]]:
        return [(b.indices, b.embeddings, [(s.path, s.reason) for s in b.skipped], b.stats)
                for b in self.embedder.embed_files(paths)]


def default_workers(ray: Any) -> int:
    """One actor per GPU on a GPU cluster, else one per two CPUs (each runs its engine's own threads)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2)


def embed_files_on_ray(embedder: Embedder, paths: Sequence[str], address: str | None = None,
                       workers: int | None = None, block_size: int | None = None) -> Iterator[EmbeddedBatch]:
    """Like ``embedder.embed_files(paths)``, but run by ``workers`` Ray actors; batches come back in order."""
    if not paths:  # no cluster, no actors, no models for nothing
        return
    ray = connect(address)
    from ray.util import ActorPool

    n = workers or default_workers(ray)
    gpu_each = 1 if ray.cluster_resources().get("GPU", 0) >= n else 0
    cpu_each = max(1, int(ray.cluster_resources().get("CPU", 1)) // n) if not gpu_each else 1
    config = replace(embedder.config, workers=cpu_each, device="gpu" if gpu_each else "cpu")  # the driver's, per actor
    prepare(embedder.runtime, embedder.backbone, embedder.weights, embedder.image_size, config.device,
            embedder.calibration if embedder.precision == "int8" else None)
    Actor = ray.remote(num_cpus=cpu_each, num_gpus=gpu_each)(_Worker)
    actors = [Actor.remote(config) for _ in range(n)]
    pool = ActorPool(actors)
    block = block_size or embedder.batch_size * 4
    starts = list(range(0, len(paths), block))
    try:
        results = pool.map(lambda actor, start: actor.embed.remote(list(paths[start : start + block])), starts)
        for start, batches in zip(starts, results):
            for indices, emb, skipped, stats in batches:
                yield EmbeddedBatch(indices + start, emb, [ImageSkipped(p, r) for p, r in skipped], stats)
    finally:
        for actor in actors:  # busy ones too (a failed batch, Ctrl-C): the models go, the cluster stays up
            ray.kill(actor)
