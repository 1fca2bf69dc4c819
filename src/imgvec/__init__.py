"""imgvec: image embeddings from pretrained Keras backbones, FAISS search and linear heads."""

from imgvec.versions import IMGVEC_VERSION as __version__  # noqa: F401  (package metadata: one source, pyproject.toml)

from imgvec.api import build_index, cache, embed, info, merge, models, predict, query, release_models, train  # noqa: E402
from imgvec.api import (  # noqa: E402
    compare, comparison_html, dedup, dedup_html, dedup_page, evaluate, evaluation_html, image_paths, inspect,
    inspect_html, inspect_map, inspect_page, predict_html, query_html,
)
from imgvec.backbones.registry import BACKBONES, Backbone, get_backbone  # noqa: E402
from imgvec.embedding.embedder import Embedder  # noqa: E402
from imgvec.errors import BadInputError, ImageSkipped, ImgvecError, MismatchError, MissingWeightsError  # noqa: E402
from imgvec.vectors.store import open_store  # noqa: E402



def __getattr__(name: str):  # noqa: ANN202
    """The head's names load scikit-learn, so they are imported on first use (``imgvec --help`` stays fast)."""
    if name in ("LogisticHead", "load_head"):
        from imgvec.vectors import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'imgvec' has no attribute {name!r}")


__all__ = [
    "BACKBONES", "Backbone", "BadInputError", "Embedder", "ImageSkipped", "ImgvecError", "LogisticHead",
    "MismatchError", "MissingWeightsError", "build_index", "embed", "merge", "get_backbone", "info", "load_head",
    "models", "open_store", "predict", "query", "release_models", "cache", "train",
    "compare", "comparison_html", "dedup", "dedup_html", "dedup_page", "evaluate", "evaluation_html", "image_paths",
    "predict_html", "query_html", "inspect", "inspect_html", "inspect_map", "inspect_page",
]
