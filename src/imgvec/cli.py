"""The ``imgvec`` command: parse arguments, call one API function, print the result.

Errors imgvec raises on purpose become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from . import api, report
from .errors import ImgvecError
from .images import DEFAULT_MAX_PIXELS
from .provenance import Provenance
from .runtime import RuntimeNote

app = typer.Typer(
    name="imgvec",
    help="Embed folders of images with pretrained Keras backbones, search them with FAISS, "
    "and classify them with a logistic-regression head.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

FormatOpt = typer.Option("table", "--format", "-f", help="table, json or csv")
FaissGpuOpt = typer.Option("auto", "--faiss-gpu", help="auto (GPU when faiss has GPU support and sees one), on, off")
WeightsOpt = typer.Option(None, "--weights", help="imagenet, none (random, seed --seed) or a weights file")
HtmlOpt = typer.Option(None, "--html", help="also write a self-contained HTML page with thumbnails here")
RuntimeOpt = typer.Option("auto", "--runtime", help="auto (OpenVINO on the CPU, TensorFlow on a GPU), openvino, "
                          "tensorflow, jax or torch; every runtime gives the same embeddings")


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` as a command whose ImgvecErrors end as one line and an exit code."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_notes(warnings.showwarning)
                return fn(*args, **kwargs)
        except ImgvecError as error:
            _err(f"imgvec: error: {error}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            _err("imgvec: interrupted")
            raise typer.Exit(130) from None

    return app.command()(run)


def _one_line_notes(show: Callable[..., None]) -> Callable[..., None]:
    """Show imgvec's own notes (:class:`RuntimeNote`) as one ``imgvec: note:`` line; others as before."""

    def showwarning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, RuntimeNote):
            _err(f"imgvec: note: {message}")
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def _check_format(fmt: str, allowed: tuple[str, ...] = report.FORMATS) -> None:
    if fmt not in allowed:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(allowed)}", param_hint="--format")


def _warn_random(prov: Provenance) -> None:
    if prov.is_random:
        _err(f"imgvec: note: {prov.backbone} has RANDOM weights (seed {prov.weights_seed}), "
             "not pretrained: results show the pipeline, not real similarity")


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        _err(f"imgvec: warning: skipped {path}: {reason}")


def _notes(skipped: list[tuple[str, str]], prov: Provenance, html: Path | None,
           write_html: Callable[[], Path]) -> None:
    """What goes to stderr beside results: skipped files, the random-weights note, the HTML page written."""
    _warn_skipped(skipped)
    _warn_random(prov)
    if html:
        _err(f"imgvec: wrote {write_html()}")


def _print_results(fmt: str, records: Callable[[], list[dict[str, Any]]], csv_header: list[str],
                   csv_rows: Callable[[], list[tuple[Any, ...]]], table: Callable[[], None]) -> None:
    """Results on stdout as JSON records, CSV rows or a table."""
    if fmt == "json":
        typer.echo(report.to_json(records()))
    elif fmt == "csv":
        typer.echo(report.to_csv(csv_header, csv_rows()), nl=False)
    else:
        table()


class _Bar:
    """A rich progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
        self.task: Any = None

    def __enter__(self) -> "_Bar":
        self.progress.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total)
        self.progress.update(self.task, completed=done)

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


@_command
def embed(
    sources: list[Path] = typer.Argument(..., help="image folders (walked recursively) or image files"),
    output: Path = typer.Option(..., "--output", "-o", help="HDF5 store to create or resume"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="backbone (default efficientnetb0; see `imgvec models`)"),
    weights: Optional[str] = WeightsOpt,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="square input size (default: the backbone's)"),
    batch_size: int = typer.Option(32, "--batch-size", help="images per model call"),
    workers: Optional[int] = typer.Option(None, "--workers", help="decoding threads (default: CPU count)"),
    seed: int = typer.Option(0, "--seed", help="seed for --weights none"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="skip images larger than this"),
    sync: bool = typer.Option(False, "--sync", help="also remove rows whose files are no longer under SOURCES"),
    engine: str = typer.Option("local", "--engine", help="local, or ray (pip install 'imgvec[ray]')"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)"),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="Ray actors (default: one per GPU, else per 2 CPUs)"),
    device: str = typer.Option("auto", "--device", help="auto (GPU when TensorFlow sees one), cpu or gpu"),
    precision: Optional[str] = typer.Option(None, "--precision", help="float32 or mixed (float16/bfloat16 compute, refused unless it matches float32 on the first batch; default: the store's, else float32)"),
    runtime: str = RuntimeOpt,
) -> None:
    """Embed images into an HDF5 store (resumes an existing store, adding only new images)."""
    with _Bar("embedding") as bar:
        s = api.embed(sources, output, model=model, weights=weights, image_size=image_size, batch_size=batch_size,
                      workers=workers, seed=seed, max_pixels=max_pixels, sync=sync, engine=engine,
                      ray_address=ray_address, ray_workers=ray_workers, device=device, precision=precision,
                      runtime=runtime, progress=bar)
    _warn_skipped(s.skipped)
    _warn_random(s.provenance)
    removed = f", {s.removed} removed" if sync else ""
    typer.echo(f"{s.store}: {s.added} images embedded, {s.already} already there, {len(s.skipped)} skipped{removed}, "
               f"{s.rows} rows in all ({s.provenance.describe()}; {s.seconds:.1f}s"
               + (f", {s.images_per_second:.1f} images/s)" if s.added else ")"))


@_command
def index(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    kind: str = typer.Option("auto", "--kind", help="auto, flat (exact), hnsw or ivfpq"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="index file (default: STORE.index.h5)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="build from scratch even if the index could be extended"),
    memory_budget: Optional[float] = typer.Option(
        None, "--memory-budget", help="GiB an auto index may hold before it picks compact IVF-PQ (default: half the RAM)"),
    faiss_gpu: str = FaissGpuOpt,
) -> None:
    """Build a FAISS index (cosine similarity) over a store, or bring an existing one up to date."""
    budget = int(memory_budget * (1 << 30)) if memory_budget is not None else None
    s = api.build_index(store, kind=kind, output=output, rebuild=rebuild, memory_budget=budget, faiss_gpu=faiss_gpu)
    how = f"added {s.added} new rows to the" if s.updated else "built a"
    typer.echo(f"{s.path}: {how} {s.kind} index over {s.rows} rows ({s.seconds:.1f}s)")


@_command
def merge(
    stores: list[Path] = typer.Argument(..., help="stores made with the same backbone, weights and input size"),
    output: Path = typer.Option(..., "--output", "-o", help="new store to write"),
    on_duplicate: str = typer.Option("first", "--on-duplicate", help="first (keep the first store's row) or error"),
) -> None:
    """Merge several stores (shards from several machines or runs) into one."""
    s = api.merge(stores, output, on_duplicate=on_duplicate)
    typer.echo(f"{s.store}: {s.rows} rows from {s.inputs} stores ({s.duplicates} duplicate paths dropped; "
               f"{s.seconds:.1f}s); run `imgvec index {s.store}` to search it")


@_command
def query(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    queries: list[Path] = typer.Argument(..., help="query images or folders of them"),
    k: int = typer.Option(10, "-k", help="neighbours per query"),
    fmt: str = FormatOpt,
    index_path: Optional[Path] = typer.Option(None, "--index", help="index file (default: STORE.index.h5)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="where the store's weights file is now, if moved"),
    html: Optional[Path] = HtmlOpt,
    faiss_gpu: str = FaissGpuOpt,
    runtime: str = RuntimeOpt,
) -> None:
    """Find the stored images most like each query image."""
    _check_format(fmt)
    r = api.query(store, queries, k=k, index=index_path, weights=weights, faiss_gpu=faiss_gpu, runtime=runtime)
    _notes(r.skipped, r.provenance, html, lambda: api.query_html(r, html, store))

    def table() -> None:
        typer.echo(f"# {r.provenance.describe()}; {r.index_kind} index")
        for q in r.queries:
            typer.echo(report.table(f"query: {q.query}", ["rank", "score", "path", "label"],
                                    [(n.rank, n.score, n.path, n.label) for n in q.results],
                                    justify=["right", "right", "left", "left"]), nl=False)

    _print_results(fmt, lambda: [{"query": q.query, "results": [{"rank": n.rank, "path": n.path, "score": n.score}
                                                               for n in q.results]} for q in r.queries],
                   ["query", "rank", "path", "score"],
                   lambda: [(q.query, n.rank, n.path, n.score) for q in r.queries for n in q.results], table)


@_command
def train(
    store: Path = typer.Argument(..., help="HDF5 store with labels (one subfolder per class)"),
    output: Path = typer.Option(..., "--output", "-o", help="head file to write (HDF5)"),
    cv: int = typer.Option(5, "--cv", help="cross-validation folds"),
) -> None:
    """Train a logistic-regression head on a store's labelled embeddings."""
    s = api.train(store, output, cv=cv)
    _warn_random(s.provenance)
    rows = [(c, s.report[c]["precision"], s.report[c]["recall"], s.report[c]["f1-score"], int(s.report[c]["support"]))
            for c in s.classes]
    typer.echo(report.table(None, ["class", "precision", "recall", "f1", "images"], rows,
                            justify=["left", "right", "right", "right", "right"]), nl=False)
    skipped = f", {s.n_unlabelled} unlabelled rows left out" if s.n_unlabelled else ""
    typer.echo(f"{s.head}: {len(s.classes)} classes, {s.n_train} images{skipped}; C={s.C:.4g}; "
               f"{cv}-fold CV accuracy {s.cv_accuracy:.3f} ± {s.cv_accuracy_std:.3f} ({s.seconds:.1f}s)")


@_command
def predict(
    head: Path = typer.Argument(..., help="head file made by `imgvec train`"),
    images: list[Path] = typer.Argument(..., help="images or folders of them"),
    fmt: str = FormatOpt,
    top: int = typer.Option(3, "--top", help="probabilities shown per image in the table"),
    weights: Optional[str] = typer.Option(None, "--weights", help="where the head's weights file is now, if moved"),
    html: Optional[Path] = HtmlOpt,
    runtime: str = RuntimeOpt,
) -> None:
    """Classify images with a trained head."""
    _check_format(fmt)
    r = api.predict(head, images, weights=weights, runtime=runtime)
    _notes(r.skipped, r.provenance, html, lambda: api.predict_html(r, html, top=top))

    def table() -> None:
        def best(p: api.Prediction) -> str:
            ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:top]
            return ", ".join(f"{c} {v:.3f}" for c, v in ranked)

        typer.echo(f"# {r.provenance.describe()}")
        typer.echo(report.table(None, ["path", "label", "probabilities"],
                                [(p.path, p.label, best(p)) for p in r.predictions]), nl=False)

    _print_results(fmt, lambda: [{"path": p.path, "label": p.label, "probabilities": p.probabilities}
                                 for p in r.predictions],
                   ["path", "label", *r.classes],
                   lambda: [(p.path, p.label, *p.probabilities.values()) for p in r.predictions], table)


@_command
def models(fmt: str = FormatOpt) -> None:
    """List the backbones: name, input size, embedding size, parameters."""
    _check_format(fmt)
    rows = [(b.name, b.input_size, b.dim, b.params, b.preprocessing) for b in api.models()]
    header = ["name", "input_size", "dim", "params", "preprocessing"]
    typer.echo(report.render(fmt, [dict(zip(header, r)) for r in rows], header,
                             [(n, s, d, f"{p:,}" if fmt == "table" else p, pp) for n, s, d, p, pp in rows],
                             justify=["left", "right", "right", "right", "left"]), nl=fmt != "csv")


@_command
def info(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json"),
) -> None:
    """Show how a store was made, what it holds and whether its index is up to date."""
    _check_format(fmt, ("table", "json"))
    data = api.info(store)
    if fmt == "json":
        typer.echo(report.to_json(data))
        return
    prov: Provenance = data.pop("provenance")
    if prov.is_random:
        data["WARNING"] = "RANDOM weights: not pretrained"
    rows = [(k, v) for k, v in data.items()] + [(f"provenance.{k}", v) for k, v in vars(prov).items()]
    typer.echo(report.table(None, ["field", "value"], rows), nl=False)


@_command
def cache(
    clear: bool = typer.Option(False, "--clear", help="remove every cached model"),
    fmt: str = FormatOpt,
) -> None:
    """List the compiled OpenVINO models imgvec keeps (IMGVEC_CACHE_DIR, else ~/.cache/imgvec), or clear them."""
    _check_format(fmt)
    c = api.cache(clear=clear)
    if clear:
        _err(f"imgvec: removed {c.cleared} cached models ({c.freed / 1e6:.1f} MB) from {c.folder}")
    header = ["backbone", "input_size", "weights", "mb", "age_days", "ok", "path"]
    rows = [(e.backbone, e.input_size, e.weights, round(e.bytes / 1e6, 1), round(e.age_s / 86400, 1),
             "yes" if e.ok else "no (rebuilt on next use)", str(e.path)) for e in c.entries]
    if fmt == "table":
        typer.echo(f"# {c.folder}: {len(rows)} compiled models, {sum(e.bytes for e in c.entries) / 1e6:.1f} MB")
    typer.echo(report.render(fmt, [dict(zip(header, r)) for r in rows], header, rows), nl=fmt != "csv")


# -- compare, dedup, evaluate ------------------------------------------------------------
class _PerModelBar:
    """One progress bar per backbone for ``compare`` (drawn only on a terminal)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.bar: _Bar | None = None

    def __call__(self, name: str, done: int, total: int) -> None:
        if name != self.name:
            self.close()
            self.name, self.bar = name, _Bar(f"embedding with {name}").__enter__()
        assert self.bar is not None
        self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@_command
def compare(
    labelled_dir: Path = typer.Argument(..., help="folder with one subfolder of images per class"),
    models: str = typer.Option("vgg16,inceptionv3,resnet50,efficientnetb0", "--models", "-m",
                               help="comma-separated backbones (see `imgvec models`)"),
    cv: int = typer.Option(5, "--cv", help="cross-validation folds (the same folds for every backbone)"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write an HTML report (confusion matrices, "
                                        "accuracy-vs-speed plot) here"),
    stores: Path = typer.Option(Path("imgvec-compare"), "--stores", help="folder for the per-backbone stores "
                                "(<backbone>.h5), reused on the next run"),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet or none (random, seed --seed)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="input size for every backbone "
                                             "(default: each backbone's own)"),
    batch_size: int = typer.Option(32, "--batch-size", help="images per batch"),
    seed: int = typer.Option(0, "--seed", help="seed for --weights none and for the folds"),
    fmt: str = FormatOpt,
) -> None:
    """Compare backbones on your labelled images: accuracy (same CV folds), speed, size."""
    _check_format(fmt)
    bar = _PerModelBar()
    try:
        c = api.compare(labelled_dir, [m.strip() for m in models.split(",") if m.strip()], cv=cv, stores=stores,
                        weights=weights, image_size=image_size, batch_size=batch_size, seed=seed,
                        random_state=seed, progress=bar)
    finally:
        bar.close()
    for r in c.rows[:1]:
        _warn_random(r.provenance)
    if html:
        _err(f"imgvec: wrote {api.comparison_html(c, html)}")
    header = ["backbone", "params", "dim", "images_per_second", "accuracy", "accuracy_std", "weakest_class",
              "weakest_f1"]
    if fmt == "json":
        typer.echo(report.to_json([{
            "backbone": r.backbone, "params": r.params, "dim": r.dim, "images_per_second": r.images_per_second,
            "accuracy": r.accuracy, "accuracy_std": r.accuracy_std, "fold_accuracies": r.fold_accuracies,
            "per_class_f1": r.per_class_f1, "store": str(r.store), "weights": r.provenance.weights,
            "new_images_embedded": r.embedded,
        } for r in c.rows]))
    elif fmt == "csv":
        typer.echo(report.to_csv(header + [f"f1_{k}" for k in c.classes], [
            (r.backbone, r.params, r.dim, r.images_per_second, r.accuracy, r.accuracy_std, r.weakest_class,
             r.weakest_f1, *[r.per_class_f1.get(k, 0.0) for k in c.classes]) for r in c.rows]), nl=False)
    else:
        rows = [(r.backbone, f"{r.params:,}", r.dim, f"{r.images_per_second:.1f}",
                 f"{r.accuracy:.3f} ± {r.accuracy_std:.3f}", f"{r.weakest_class} ({r.weakest_f1:.3f})")
                for r in c.rows]
        typer.echo(f"# {c.n_images} images, {len(c.classes)} classes; {c.cv}-fold CV, the same folds for every "
                   f"backbone; images/s measured on {c.machine}")
        typer.echo(report.table(None, ["backbone", "parameters", "embedding size", "images/s", "CV accuracy",
                                       "weakest class (F1)"], rows,
                                justify=["left", "right", "right", "right", "right", "left"]), nl=False)


@_command
def dedup(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    threshold: float = typer.Option(0.95, "--threshold", "-t", help="cosine similarity that makes a near duplicate"),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json, csv or html (to stdout)"),
    hash_files: bool = typer.Option(True, "--hash/--no-hash", help="also find identical files by sha256"),
    exact: bool = typer.Option(False, "--exact", help="exhaustive pair search even above 20,000 images (slower)"),
) -> None:
    """List groups of near-duplicate images (and identical files) in a store."""
    _check_format(fmt, (*report.FORMATS, "html"))
    with _Bar("reading") as bar:
        d = api.dedup(store, threshold=threshold, check_files=hash_files, exact=exact or None, progress=bar)
    _warn_random(d.provenance)
    if d.missing:
        _err(f"imgvec: warning: {len(d.missing)} files could not be read for hashing, e.g. {d.missing[0]}")
    if fmt == "html":
        typer.echo(api.dedup_page(d), nl=False)
    elif fmt == "json":
        typer.echo(report.to_json([{"group": i, "kind": g.kind, "sha256": g.sha256 or None,
                                    "images": [{"path": m.path, "score": m.score} for m in g.members]}
                                   for i, g in enumerate(d.groups, 1)]))
    elif fmt == "csv":
        typer.echo(report.to_csv(["group", "kind", "path", "score", "sha256"],
                                 [(i, g.kind, m.path, m.score, g.sha256) for i, g in enumerate(d.groups, 1)
                                  for m in g.members]), nl=False)
    else:
        typer.echo(f"# {d.provenance.describe()}; {d.rows} images: {d.exact_groups} groups of identical files, "
                   f"{d.near_groups} groups of near duplicates (cosine >= {threshold:g}); {d.method} search, "
                   f"{d.seconds:.1f}s")
        typer.echo(report.table(None, ["group", "kind", "similarity", "path"],
                                [(i, g.kind, m.score, m.path) for i, g in enumerate(d.groups, 1) for m in g.members],
                                justify=["right", "left", "right", "left"]), nl=False)


@_command
def evaluate(
    head: Path = typer.Argument(..., help="head file made by `imgvec train`"),
    data: Path = typer.Argument(..., help="held-out images (one subfolder per class) or a store of them"),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write an HTML report here"),
    weights: Optional[str] = typer.Option(None, "--weights", help="where the head's weights file is now, if moved"),
    runtime: str = RuntimeOpt,
) -> None:
    """Score a head on held-out labelled data: accuracy, per-class P/R/F1, confusion matrix."""
    _check_format(fmt, ("table", "json"))
    e = api.evaluate(head, data, weights=weights, runtime=runtime)
    _warn_skipped(e.skipped)
    _warn_random(e.provenance)
    if html:
        _err(f"imgvec: wrote {api.evaluation_html(e, html)}")
    if fmt == "json":
        typer.echo(report.to_json({"accuracy": e.accuracy, "images": e.n_images, "labels": e.labels,
                                   "report": e.report, "confusion": e.confusion, "unknown_labels": e.unknown}))
        return
    typer.echo(f"# {e.provenance.describe()}")
    rows = [(c, e.report[c]["precision"], e.report[c]["recall"], e.report[c]["f1-score"], int(e.report[c]["support"]))
            for c in e.labels]
    typer.echo(report.table(None, ["class", "precision", "recall", "f1", "images"], rows,
                            justify=["left", "right", "right", "right", "right"]), nl=False)
    typer.echo(report.table("confusion matrix (rows: true, columns: predicted)", ["true \\ predicted", *e.labels],
                            [(c, *map(int, row)) for c, row in zip(e.labels, e.confusion)],
                            justify=["left"] + ["right"] * len(e.labels)), nl=False)
    for label, n in e.unknown.items():
        _err(f"imgvec: note: {n} images labelled {label!r}, a class the head was not trained on, count as wrong")
    typer.echo(f"accuracy {e.accuracy:.3f} on {e.n_images} images")


def main() -> None:
    app(prog_name="imgvec")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
