"""The ``imgvec`` command: parse arguments, call one API function, print the result.

Errors imgvec raises on purpose become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
import typer.core

from . import api, report
from .errors import ImgvecError
from .fileio import check_writable
from .images import DEFAULT_MAX_PIXELS
from .provenance import Provenance
from .runtime import RuntimeNote
from .report import plural


# click's base error, wherever this typer keeps click (its own copy since typer 0.23, the click package before)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Group(typer.core.TyperGroup):
    """typer's command group, with click's usage errors in imgvec's one-line style (exit 2)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except _ClickException as error:  # --format xml, a missing argument, an unknown option
            if type(error).__name__ == "NoArgsIsHelpError":  # bare `imgvec`: the help on stdout, stderr clean
                typer.echo(error.ctx.get_help(), nl=False)
            else:
                ctx = getattr(error, "ctx", None)
                where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                _err(f"imgvec: error: {' '.join(error.format_message().split()).rstrip('.')}{where}")
            code = error.exit_code
        except typer.Abort:
            _err("imgvec: interrupted")
            code = 130
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Group,
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
            _err(f"imgvec: error: {error.cli_message()}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:  # the library says what was kept, where it knows
            _err("imgvec: interrupted" + (f"; {interrupt}" if str(interrupt) else ""))
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


def _check_html(html: Path | None) -> None:
    """The page is written after the work: check where it goes before, so a typo costs nothing."""
    if html is not None:
        check_writable(html)


def _warn_random(prov: Provenance) -> None:
    if prov.is_random:
        _err(f"imgvec: note: {prov.backbone} has RANDOM weights (seed {prov.weights_seed}), "
             "not pretrained: results show the pipeline, not real similarity")


def _weights_cell(prov: Provenance) -> str:
    return f"RANDOM (seed {prov.weights_seed})" if prov.is_random else prov.weights_spec.describe()


def _mark(correct: bool | None) -> str:
    return "" if correct is None else ("right" if correct else "WRONG")


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
    """A rich progress bar on stderr, drawn only when stderr is a terminal (else it writes nothing at all)."""

    def __init__(self, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.progress = (Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  console=console, transient=True) if console.is_terminal else None)
        self.task: Any = None

    def __enter__(self) -> "_Bar":
        if self.progress:
            self.progress.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=total)
        self.progress.update(self.task, completed=done)

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
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
    engine: str = typer.Option("local", "--engine", help="local, or ray (pip install 'imgvec\\[ray]')"),
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
    built = f"model built in {s.build_seconds:.1f}s, then " if s.build_seconds else ""
    speed = f": {built}{s.images_per_second:.1f} images/s" if s.added else ""
    typer.echo(f"{s.store}: {s.added} images embedded, {s.already} already there, {len(s.skipped)} skipped{removed}, "
               f"{s.rows} rows in all ({s.provenance.describe()}; {s.seconds:.1f}s{speed})")


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
    _check_html(html)
    r = api.query(store, queries, k=k, index=index_path, weights=weights, faiss_gpu=faiss_gpu, runtime=runtime)
    for note in r.notes:
        _err(f"imgvec: note: {note}")
    _notes(r.skipped, r.provenance, html, lambda: api.query_html(r, html, store))

    def table() -> None:
        typer.echo(f"# {r.provenance.describe()}; {r.index_kind} index")
        for q in r.queries:
            typer.echo(report.table(f"query: {q.query}", ["rank", "score", "path", "label"],
                                    [(n.rank, n.score, n.path, n.label) for n in q.results],
                                    justify=["right", "right", "left", "left"]), nl=False)

    _print_results(fmt, lambda: [{"query": q.query, "results": [{"rank": n.rank, "path": n.path, "score": n.score,
                                                                "label": n.label} for n in q.results]}
                                 for q in r.queries],
                   ["query", "rank", "path", "score", "label"],
                   lambda: [(q.query, n.rank, n.path, n.score, n.label) for q in r.queries for n in q.results], table)


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
               f"{cv}-fold CV accuracy {s.cv_accuracy:.3f} ± {s.cv_accuracy_std:.3f} ({s.seconds:.1f}s: choosing C "
               f"among {s.n_Cs} values by {cv}-fold CV {s.search_seconds:.1f}s, the final fit {s.fit_seconds:.1f}s)")


@_command
def predict(
    head: Path = typer.Argument(..., help="head file made by `imgvec train`"),
    images: list[Path] = typer.Argument(..., help="images, folders of them, or stores (.h5) made with the head's settings"),
    fmt: str = FormatOpt,
    top: int = typer.Option(3, "--top", help="probabilities shown per image in the table"),
    weights: Optional[str] = typer.Option(None, "--weights", help="where the head's weights file is now, if moved"),
    html: Optional[Path] = HtmlOpt,
    runtime: str = RuntimeOpt,
) -> None:
    """Classify images with a trained head."""
    _check_format(fmt)
    _check_html(html)
    r = api.predict(head, images, weights=weights, runtime=runtime)
    _notes(r.skipped, r.provenance, html, lambda: api.predict_html(r, html, top=top))

    labelled = bool(r.labelled)  # images in class folders: the true label beside the predicted one

    def table() -> None:
        def best(p: api.Prediction) -> str:
            ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:top]
            return ", ".join(f"{c} {v:.3f}" for c, v in ranked)

        typer.echo(f"# {r.provenance.describe()}; head: {len(r.classes)} classes, C={r.C:.4g}, "
                   f"cross-validated accuracy {r.cv_accuracy:.3f} ± {r.cv_accuracy_std:.3f}")
        if labelled:
            typer.echo(report.table(None, ["path", "predicted", "true", "", "probabilities"],
                                    [(p.path, p.label, p.truth, _mark(p.correct), best(p)) for p in r.predictions]),
                       nl=False)
            right = sum(bool(p.correct) for p in r.labelled)
            typer.echo(f"accuracy {r.accuracy:.3f}: {right} of {len(r.labelled)} images in class folders "
                       "predicted right")
        else:
            typer.echo(report.table(None, ["path", "predicted", "probabilities"],
                                    [(p.path, p.label, best(p)) for p in r.predictions]), nl=False)

    def record(p: api.Prediction) -> dict[str, Any]:
        return {"path": p.path, "predicted": p.label, **({"true": p.truth, "correct": p.correct} if labelled else {}),
                "probabilities": p.probabilities}

    _print_results(fmt, lambda: [record(p) for p in r.predictions],
                   ["path", "predicted", *(["true", "correct"] if labelled else []), *r.classes],
                   lambda: [(p.path, p.label, *((p.truth, p.correct) if labelled else ()), *p.probabilities.values())
                            for p in r.predictions], table)


_MODEL_COLUMNS = ["name", "input_size", "dim", "params", "top1", "top5", "size_mb", "depth", "images_per_second",
                  "preprocessing"]


@_command
def models(
    fmt: str = FormatOpt,
    sort: str = typer.Option("", "--sort", help=f"sort by a column: {', '.join(_MODEL_COLUMNS)} "
                                                "(numbers largest first; blanks last)"),
) -> None:
    """List the backbones: input and embedding size, parameters, Keras' published ImageNet accuracy, speed here."""
    _check_format(fmt)
    if sort and sort not in _MODEL_COLUMNS:
        raise typer.BadParameter(f"{sort!r} is not one of {', '.join(_MODEL_COLUMNS)}", param_hint="--sort")
    rows = [{c: getattr(b, c) for c in _MODEL_COLUMNS} for b in api.models()]
    if sort:
        numeric = sort not in ("name", "preprocessing")
        filled = [r for r in rows if r[sort] is not None]
        rows = sorted(filled, key=lambda r: r[sort], reverse=numeric) + [r for r in rows if r[sort] is None]
    if fmt == "table":
        typer.echo("# top1/top5: ImageNet validation accuracy and size_mb/depth as published by Keras "
                   "(keras.io/api/applications); images_per_second: `imgvec embed` on a 2-core CPU at 224 px "
                   "(benchmarks/results/embed.json); blank: not published or not measured")

    def cell(column: str, value: Any) -> Any:
        if fmt != "table":
            return "" if value is None else value
        if value is None:
            return ""
        return f"{value:,}" if column == "params" else (f"{value:.3f}" if column in ("top1", "top5") else value)

    typer.echo(report.render(fmt, rows, _MODEL_COLUMNS, [[cell(c, r[c]) for c in _MODEL_COLUMNS] for r in rows],
                             justify=["left"] + ["right"] * 8 + ["left"]), nl=fmt != "csv")


@_command
def info(
    path: Path = typer.Argument(..., help="an imgvec file: store, index or head"),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json"),
) -> None:
    """Show what an imgvec file (store, index or head) holds and how it was made."""
    _check_format(fmt, ("table", "json"))
    data = api.info(path)
    if fmt == "json":
        typer.echo(report.to_json(data))
        return
    prov: Provenance = data.pop("provenance")
    if prov.is_random:
        data["WARNING"] = "RANDOM weights: not pretrained"
    rows = _flat(data) + [(f"provenance.{k}", v) for k, v in vars(prov).items() if v is not None]
    typer.echo(report.table(None, ["field", "value"], rows), nl=False)


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted names, lists joined: values a person reads, not Python reprs."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows.extend(_flat(value, f"{prefix}{key}.") if value else [(f"{prefix}{key}", "none")])
        elif isinstance(value, (list, tuple)):
            rows.append((f"{prefix}{key}", ", ".join(map(str, value))))
        else:
            rows.append((f"{prefix}{key}", "none" if value is None else value))
    return rows


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
             "yes" if e.ok else f"no: does not convert ({e.error})" if e.error else "no (rebuilt on next use)",
             str(e.path)) for e in c.entries]
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
    runtime: str = RuntimeOpt,
    fmt: str = FormatOpt,
) -> None:
    """Compare backbones on your labelled images: accuracy (same CV folds), speed, size."""
    _check_format(fmt)
    _check_html(html)
    bar = _PerModelBar()
    try:
        c = api.compare(labelled_dir, [m.strip() for m in models.split(",") if m.strip()], cv=cv, stores=stores,
                        weights=weights, image_size=image_size, batch_size=batch_size, seed=seed,
                        random_state=seed, runtime=runtime, progress=bar)
    finally:
        bar.close()
    for r in c.rows:
        _warn_random(r.provenance)
    if html:
        _err(f"imgvec: wrote {api.comparison_html(c, html)}")
    header = ["backbone", "weights", "params", "dim", "images_per_second", "accuracy", "accuracy_std",
              "weakest_class", "weakest_f1"]
    if fmt == "json":
        typer.echo(report.to_json({
            "images": c.n_images, "classes": c.classes, "cv": c.cv, "images_per_second_measures": c.speed_note,
            "backbones": [{
                "backbone": r.backbone, "weights": r.provenance.weights_spec.describe(), "params": r.params,
                "dim": r.dim, "images_per_second": r.images_per_second, "accuracy": r.accuracy,
                "accuracy_std": r.accuracy_std, "fold_accuracies": r.fold_accuracies, "per_class_f1": r.per_class_f1,
                "store": str(r.store), "new_images_embedded": r.embedded,
            } for r in c.rows],
            "chance": [{"baseline": b.name, "accuracy": b.accuracy, "accuracy_std": b.accuracy_std,
                        "fold_accuracies": b.fold_accuracies} for b in c.baselines],
        }))
    elif fmt == "csv":
        typer.echo(report.to_csv(header + [f"f1_{k}" for k in c.classes], [
            *[(r.backbone, r.provenance.weights_spec.describe(), r.params, r.dim, r.images_per_second, r.accuracy,
               r.accuracy_std, r.weakest_class, r.weakest_f1, *[r.per_class_f1.get(k, 0.0) for k in c.classes])
              for r in c.rows],
            *[(b.description, "", "", "", "", b.accuracy, b.accuracy_std, "", "", *[""] * len(c.classes))
              for b in c.baselines]]), nl=False)
    else:
        rows = [(r.backbone, _weights_cell(r.provenance), f"{r.params:,}", r.dim, f"{r.images_per_second:.1f}",
                 f"{r.accuracy:.3f} ± {r.accuracy_std:.3f}", f"{r.weakest_class} ({r.weakest_f1:.3f})")
                for r in c.rows]
        rows += [(b.description, "", "", "", "", f"{b.accuracy:.3f} ± {b.accuracy_std:.3f}", "")
                 for b in c.baselines]
        typer.echo(f"# {c.n_images} images, {len(c.classes)} classes; {c.cv}-fold CV, the same folds for every "
                   "backbone and for the chance rows")
        typer.echo(f"# {c.speed_note}")
        typer.echo(report.table(None, ["backbone", "weights", "parameters", "embedding size", "images/s",
                                       "CV accuracy", "weakest class (F1)"], rows,
                                justify=["left", "left", "right", "right", "right", "right", "left"]), nl=False)


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
    if d.degenerate:
        _err(f"imgvec: warning: about {d.share_above:.0%} of all pairs of images are above --threshold {threshold:g}: "
             "the embeddings do not tell these images apart (random weights or an unsuitable backbone?), "
             "so the groups mean little")
    exact_of = d.exact_group_of

    def copy_of(g: Any, path: str) -> int | None:
        """In a near group, the group of identical files this image stands for (its copies are not repeated)."""
        return exact_of.get(path) if g.kind == "near" else None

    if fmt == "html":
        typer.echo(api.dedup_page(d), nl=False)
    elif fmt == "json":
        typer.echo(report.to_json([{"group": i, "kind": g.kind, "found_by": d.found_by(g), "sha256": g.sha256 or None,
                                    "images": [{"path": m.path, "score": m.score, "identical_files_group":
                                                copy_of(g, m.path)} for m in g.members]}
                                   for i, g in enumerate(d.groups, 1)]))
    elif fmt == "csv":
        typer.echo(report.to_csv(["group", "kind", "path", "score", "sha256", "identical_files_group", "found_by"],
                                 [(i, g.kind, m.path, m.score, g.sha256, copy_of(g, m.path) or "", d.found_by(g))
                                  for i, g in enumerate(d.groups, 1) for m in g.members]), nl=False)
    else:
        typer.echo(f"# {d.rows} images: {plural(d.exact_groups, 'group')} of identical files (sha256), "
                   f"{plural(d.near_groups, 'group')} of near duplicates: cosine >= {threshold:g} on the store's "
                   f"features ({d.provenance.describe()}); {d.method} search, {d.seconds:.1f}s")
        typer.echo(report.table(None, ["group", "kind", "similarity", "path"],
                                [(i, g.kind, m.score, m.path + (f"  (identical files: group {copy_of(g, m.path)})"
                                                                if copy_of(g, m.path) else ""))
                                 for i, g in enumerate(d.groups, 1) for m in g.members],
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
    _check_html(html)
    e = api.evaluate(head, data, weights=weights, runtime=runtime)
    _warn_skipped(e.skipped)
    _warn_random(e.provenance)
    if e.seen_in_training:
        _err(f"imgvec: WARNING: the head was trained on {e.seen_in_training} of these {e.n_images} images: "
             "this accuracy is NOT a held-out estimate (evaluate on images the head has not seen)")
    if html:
        _err(f"imgvec: wrote {api.evaluation_html(e, html)}")
    if fmt == "json":
        typer.echo(report.to_json({"accuracy": e.accuracy, "chance": e.chance, "images": e.n_images,
                                   "labels": e.labels, "report": e.report, "confusion": e.confusion,
                                   "unknown_labels": e.unknown}))
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
    typer.echo(f"accuracy {e.accuracy:.3f} on {e.n_images} images (chance: {e.chance['majority_class']:.3f} always "
               f"guessing the most common class, {e.chance['stratified_random']:.3f} guessing by the class shares)")


def main() -> None:
    app(prog_name="imgvec")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
