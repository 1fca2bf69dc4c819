"""The ``imgvec`` command: parse arguments, call one API function, print the result.

Errors imgvec raises on purpose become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
import typer.core

from imgvec import __version__, api
from imgvec.cli.reporter import Reporter
from imgvec.errors import FileNote, ImgvecError, RuntimeNote, did_you_mean
from imgvec.pages import report
from imgvec.results import MODEL_COLUMNS, Records, Table, plural, random_weights_note


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
                text = error.ctx.get_help()
                typer.echo(text, nl=not text.endswith("\n"))
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
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode=None,  # plain click help: flags without a '<bool>' type, the same text in docs/cli.md
    pretty_exceptions_enable=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"imgvec {__version__}")
        raise typer.Exit()


@app.callback()
def _imgvec(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                         help="print imgvec's version and exit")) -> None:
    """Embed folders of images with pretrained Keras backbones, search them with FAISS,
    and classify them with a logistic-regression head."""


def _choices(choices: Sequence[str] | str) -> Callable[[str], list[str]]:
    """Shell completion of an option's values: the very choices its check accepts (a name: api.choices()'s)."""

    def complete(incomplete: str) -> list[str]:
        values = api.choices()[choices] if isinstance(choices, str) else choices
        return [c for c in values if c.startswith(incomplete.lower())]

    return complete


_complete_models = _choices("model")
_complete_runtimes = _choices("runtime")


def _complete_model_list(incomplete: str) -> list[str]:
    """``--models a,b,c``: the last name completed, the ones before kept."""
    done, _, last = incomplete.rpartition(",")
    return [f"{done}," * bool(done) + name for name in _complete_models(last)]


# The --format values each command accepts (checked by _check_format, completed by the shell).
TABLE_JSON = ("table", "json")
DEDUP_FORMATS = (*report.FORMATS, "html")

FormatOpt = typer.Option("table", "--format", "-f", help="table, json or csv", autocompletion=_choices(report.FORMATS))
FaissGpuOpt = typer.Option("auto", "--faiss-gpu", autocompletion=_choices("faiss_gpu"),
                           help="auto (GPU when faiss has GPU support and sees one), on, off")
WeightsOpt = typer.Option(None, "--weights", help="imagenet, none (random, seed --seed) or a weights file")
ModelPathOpt = typer.Option(None, "--model", "-m", help="where the model file (--model PATH at embed time) is now, "
                            "if moved; it must hold the same bytes")
HtmlOpt = typer.Option(None, "--html", help="also write a self-contained HTML page with thumbnails here")
RuntimeOpt = typer.Option("auto", "--runtime", autocompletion=_complete_runtimes,
                          help="auto (OpenVINO on the CPU, TensorFlow on a GPU), openvino, tensorflow, jax or torch; "
                          "with pretrained weights or a weights file all give the same embeddings; seeded random "
                          "weights (--weights none) are drawn differently by jax and torch, so such a store is "
                          "used only with its own family (openvino and tensorflow share one)")


def _err(message: str) -> None:
    """One line on stderr; names in it are shown safely (a newline or escape in a file name cannot forge a line)."""
    typer.echo(report.shown(message), err=True)


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` as a command whose ImgvecErrors end as one line and an exit code."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        previous = (signal.signal(signal.SIGTERM, _on_sigterm)
                    if threading.current_thread() is threading.main_thread() else None)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_notes(warnings.showwarning)
                return fn(*args, **kwargs)
        except ImgvecError as error:
            _err(f"imgvec: error: {error.cli_message(_options())}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as interrupt:  # the library says what was kept, where it knows
            terminated = isinstance(interrupt, _Terminated)
            _err("imgvec: interrupted" + (" (SIGTERM)" if terminated else "")
                 + (f"; {interrupt}" if str(interrupt) else ""))
            raise typer.Exit(143 if terminated else 130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return app.command()(run)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``docker stop``), raised where Ctrl-C would be: the same clean stop."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends the process at once
    raise _Terminated()


def _options() -> dict[str, str]:
    """The running command's parameters as the options that set them: ``k`` -> ``-k``, ``index_path`` -> ``--index``."""
    import importlib

    click_core = next(c for c in typer.Context.__mro__ if c.__module__.endswith("click.core")).__module__
    ctx = importlib.import_module(click_core.rsplit(".", 1)[0] + ".globals").get_current_context(silent=True)
    params = ctx.command.params if ctx is not None else []
    return {p.name: max(p.opts, key=lambda o: (o.startswith("--"), len(o)))
            for p in params if p.name and p.opts and p.opts[0].startswith("-")}


def _one_line_notes(show: Callable[..., None]) -> Callable[..., None]:
    """Show imgvec's own notes (:class:`RuntimeNote`, :class:`FileNote`) as one ``imgvec: note:`` line; others as before."""

    def showwarning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, (RuntimeNote, FileNote)):
            _err(f"imgvec: note: {message}")
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def _check_format(fmt: str, allowed: tuple[str, ...] = report.FORMATS) -> None:
    if fmt not in allowed:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(allowed)}{did_you_mean(fmt, allowed)}",
                                 param_hint="--format")


def _warn_random(provenance: Any) -> None:
    note = random_weights_note(provenance)
    if note:
        _err(f"imgvec: note: {note}")


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        _err(f"imgvec: warning: skipped {path}: {reason}")


def _notes(skipped: list[tuple[str, str]], provenance: Any, html: Path | None,
           write_html: Callable[[], Path]) -> None:
    """What goes to stderr beside results: skipped files, the random-weights note, the HTML page written."""
    _warn_skipped(skipped)
    _warn_random(provenance)
    if html:
        _err(f"imgvec: wrote {write_html()}")


def _show(table: Table) -> None:
    """A result's table on stdout (the one renderer: :func:`imgvec.pages.report.render`)."""
    typer.echo(report.render(table), nl=False)


def _print(fmt: str, result: Records, **table: Any) -> None:
    """A result on stdout: its JSON records, its CSV rows, or its table (``table``: what it shows)."""
    if fmt == "json":
        typer.echo(report.to_json(result.to_records()))
    elif fmt == "csv":
        typer.echo(report.to_csv(result.csv_columns(), result.csv_rows()), nl=False)
    else:
        _show(result.to_table(**table))


@_command
def embed(
    sources: list[Path] = typer.Argument(..., help="image folders (walked recursively) or image files"),
    output: Path = typer.Option(..., "--output", "-o", help="HDF5 store to create or resume"),
    model: Optional[str] = typer.Option(None, "--model", "-m", autocompletion=_complete_models,
                                        help="backbone (default efficientnetlite0, pretrained weights installed; see "
                                        "`imgvec models`), or your own model file: PATH ending in .keras, .onnx or "
                                        ".xml (OpenVINO IR, .bin beside)"),
    weights: Optional[str] = WeightsOpt,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="square input size (default: the backbone's)"),
    batch_size: int = typer.Option(32, "--batch-size", help="images per model call"),
    workers: Optional[int] = typer.Option(None, "--workers", help="decoding threads (default: CPU count)"),
    seed: int = typer.Option(0, "--seed", help="seed for --weights none"),
    max_pixels: int = typer.Option(api.DEFAULT_MAX_PIXELS, "--max-pixels", help="skip images larger than this"),
    sync: bool = typer.Option(False, "--sync", help="also remove rows whose files are no longer under SOURCES"),
    engine: str = typer.Option("local", "--engine", autocompletion=_choices("engine"), help="local, or ray (pip install 'imgvec[ray]')"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)"),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="Ray actors (default: one per GPU, else per 2 CPUs)"),
    device: str = typer.Option("auto", "--device", autocompletion=_choices("device"),
                               help="auto (GPU when TensorFlow sees one), cpu or gpu"),
    precision: Optional[str] = typer.Option(None, "--precision", autocompletion=_choices("precision"), help="float32, mixed (float16/bfloat16 compute, refused unless it matches float32 on the first batch) or int8 (OpenVINO, quantized on 100 of these images, refused unless it keeps the neighbours; pip install 'imgvec[int8]'); default: the store's, else float32"),
    accept_int8: bool = typer.Option(False, "--accept-int8", help="write an int8 store even where int8 changes the embeddings more than the check allows"),
    runtime: str = RuntimeOpt,
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="a model file's input scaling: tf (x/127.5-1), "
                                             "torch (x/255, ImageNet mean/std), caffe (BGR, ImageNet mean "
                                             "subtracted) or none (raw 0-255)"),
    mean: Optional[str] = typer.Option(None, "--mean", help="instead of --preprocess: R,G,B mean on pixels scaled to "
                                       "[0, 1], e.g. 0.485,0.456,0.406"),
    std: Optional[str] = typer.Option(None, "--std", help="instead of --preprocess: R,G,B std, e.g. 0.229,0.224,0.225"),
    layer: Optional[str] = typer.Option(None, "--layer", help="a model file's output (or tensor; a layer of a .keras "
                                        "file) to embed with (default: its output; pooled when 4-D)"),
) -> None:
    """Embed images into an HDF5 store (resumes an existing store, adding only new images)."""
    config = api.EmbedConfig(model=model, weights=weights, image_size=image_size, seed=seed, batch_size=batch_size,
                             workers=workers, max_pixels=max_pixels, device=device, precision=precision,
                             runtime=runtime, preprocess=preprocess, mean=mean, std=std, layer=layer)
    with Reporter() as progress:
        s = api.embed(sources, output, config, sync=sync, engine=engine, ray_address=ray_address,
                      ray_workers=ray_workers, progress=progress, accept_int8=accept_int8)
    _warn_skipped(s.skipped)
    _warn_random(s.provenance)
    _show(s.to_table(sync=sync))


@_command
def index(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    kind: str = typer.Option("auto", "--kind", autocompletion=_choices("kind"), help="auto, flat (exact), hnsw or ivfpq"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="index file (default: STORE.index.h5)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="build from scratch even if the index could be extended"),
    memory_budget: Optional[float] = typer.Option(
        None, "--memory-budget", help="GiB an auto index may hold before it picks compact IVF-PQ (default: half the RAM)"),
    faiss_gpu: str = FaissGpuOpt,
) -> None:
    """Build a FAISS index (cosine similarity) over a store, or bring an existing one up to date."""
    budget = int(memory_budget * (1 << 30)) if memory_budget is not None else None
    with Reporter() as progress:
        s = api.build_index(store, kind=kind, output=output, rebuild=rebuild, memory_budget=budget,
                            faiss_gpu=faiss_gpu, progress=progress)
    _show(s.to_table())


@_command
def merge(
    stores: list[Path] = typer.Argument(..., help="stores made with the same backbone, weights and input size"),
    output: Path = typer.Option(..., "--output", "-o", help="new store to write"),
    on_duplicate: str = typer.Option("first", "--on-duplicate", autocompletion=_choices("on_duplicate"), help="first (keep the first store's row) or error"),
) -> None:
    """Merge several stores (shards from several machines or runs) into one."""
    with Reporter() as progress:
        s = api.merge(stores, output, on_duplicate=on_duplicate, progress=progress)
    _show(s.to_table())


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
    model: Optional[Path] = ModelPathOpt,
) -> None:
    """Find the stored images most like each query image."""
    _check_format(fmt)
    api.check_page_path(html, [store, index_path or api.index_path_for(store), *queries])
    with Reporter() as progress:
        r = api.query(store, queries, k=k, index=index_path, weights=weights, faiss_gpu=faiss_gpu, runtime=runtime,
                      progress=progress, model=model)
    for note in r.notes:
        _err(f"imgvec: note: {note}")
    _notes(r.skipped, r.provenance, html, lambda: api.query_html(r, html, store))
    _print(fmt, r)


@_command
def train(
    store: Path = typer.Argument(..., help="HDF5 store with labels (one subfolder per class)"),
    output: Path = typer.Option(..., "--output", "-o", help="head file to write (HDF5)"),
    cv: int = typer.Option(5, "--cv", help="cross-validation folds"),
) -> None:
    """Train a logistic-regression head on a store's labelled embeddings."""
    with Reporter() as progress:
        s = api.train(store, output, cv=cv, progress=progress)
    _warn_random(s.provenance)
    _show(s.to_table())


@_command
def predict(
    head: Path = typer.Argument(..., help="head file made by `imgvec train`"),
    images: list[Path] = typer.Argument(..., help="images, folders of them, or stores (.h5) made with the head's settings"),
    fmt: str = FormatOpt,
    top: int = typer.Option(3, "--top", help="probabilities shown per image in the table"),
    weights: Optional[str] = typer.Option(None, "--weights", help="where the head's weights file is now, if moved"),
    html: Optional[Path] = HtmlOpt,
    runtime: str = RuntimeOpt,
    model: Optional[Path] = ModelPathOpt,
) -> None:
    """Classify images with a trained head."""
    _check_format(fmt)
    api.check_page_path(html, [head, *images])
    with Reporter() as progress:
        r = api.predict(head, images, weights=weights, runtime=runtime, progress=progress, model=model)
    _notes(r.skipped, r.provenance, html, lambda: api.predict_html(r, html, top=top))
    _print(fmt, r, top=top)


@_command
def models(
    fmt: str = FormatOpt,
    sort: str = typer.Option("", "--sort", autocompletion=_choices("sort"), help=f"sort by a column: {', '.join(MODEL_COLUMNS)} "
                                                "(numbers largest first; blanks last)"),
) -> None:
    """List the backbones: input and embedding size, parameters, Keras' published ImageNet accuracy, speed here,
    and which have ImageNet weights at hand offline."""
    _check_format(fmt)
    _print(fmt, api.models(sort=sort or None))


@_command
def info(
    path: Path = typer.Argument(..., help="an imgvec file: store, index or head"),
    fmt: str = typer.Option("table", "--format", "-f", autocompletion=_choices(report.FORMATS),
                            help="table or json (and csv with --skipped)"),
    skipped: bool = typer.Option(False, "--skipped", help="list the files a store's embed runs skipped, with reasons"),
) -> None:
    """Show what an imgvec file (store, index or head) holds and how it was made."""
    if skipped:
        _check_format(fmt)
        _print(fmt, api.skipped_files(path))
        return
    _check_format(fmt, TABLE_JSON)
    _print(fmt, api.info(path))


@_command
def cache(
    clear: bool = typer.Option(False, "--clear", help="remove every cached model"),
    fmt: str = FormatOpt,
) -> None:
    """List the compiled OpenVINO models imgvec keeps (IMGVEC_CACHE_DIR, else ~/.cache/imgvec), or clear them."""
    _check_format(fmt)
    c = api.cache(clear=clear)
    if clear:
        _err(f"imgvec: removed {plural(c.cleared, 'cached model')} ({c.freed / 1e6:.1f} MB) from {c.folder}")
    _print(fmt, c)


# -- compare, dedup, evaluate ------------------------------------------------------------
@_command
def compare(
    labelled_dir: Path = typer.Argument(..., help="folder with one subfolder of images per class"),
    models: str = typer.Option("vgg16,inceptionv3,resnet50,efficientnetb0", "--models", "-m",
                               autocompletion=_complete_model_list,
                               help="comma-separated backbones (see `imgvec models`)"),
    cv: int = typer.Option(5, "--cv", help="cross-validation folds (the same folds for every backbone)"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write an HTML report (confusion matrices, "
                                        "accuracy-vs-speed plot) here"),
    stores: Path = typer.Option(Path("imgvec-compare"), "--stores", help="folder for the per-backbone stores "
                                "(<backbone>.h5), reused on the next run"),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, none (random, seed --seed), or a weights "
                                "file when --models names one backbone"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="input size for every backbone "
                                             "(default: each backbone's own)"),
    batch_size: int = typer.Option(32, "--batch-size", help="images per batch"),
    seed: int = typer.Option(0, "--seed", help="seed for --weights none and for the folds"),
    runtime: str = RuntimeOpt,
    fmt: str = FormatOpt,
) -> None:
    """Compare backbones on your labelled images: accuracy (same CV folds), speed, size."""
    _check_format(fmt)
    api.check_page_path(html, [labelled_dir, stores])
    config = api.EmbedConfig(weights=weights, image_size=image_size, seed=seed, batch_size=batch_size, runtime=runtime)
    with Reporter() as progress:
        c = api.compare(labelled_dir, [m.strip() for m in models.split(",") if m.strip()], config, cv=cv,
                        stores=stores, random_state=seed, progress=progress)
    for r in c.rows:
        _warn_random(r.provenance)
    if html:
        _err(f"imgvec: wrote {api.comparison_html(c, html)}")
    _print(fmt, c)


@_command
def dedup(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    threshold: float = typer.Option(0.95, "--threshold", "-t", help="cosine similarity that makes a near duplicate"),
    fmt: str = typer.Option("table", "--format", "-f", autocompletion=_choices(DEDUP_FORMATS),
                            help="table, json, csv or html (to stdout)"),
    hash_files: bool = typer.Option(True, "--hash/--no-hash", help="also find identical files by sha256"),
    exact: bool = typer.Option(False, "--exact", help="exhaustive pair search even above 20,000 images (slower)"),
    html: Optional[Path] = HtmlOpt,
) -> None:
    """List groups of near-duplicate images (and identical files) in a store."""
    _check_format(fmt, DEDUP_FORMATS)
    api.check_page_path(html, [store])
    with Reporter() as progress:
        d = api.dedup(store, threshold=threshold, check_files=hash_files, exact=exact or None, progress=progress)
    _notes([], d.provenance, html, lambda: api.dedup_html(d, html))
    if d.missing:
        _err(f"imgvec: warning: {plural(len(d.missing), 'file')} could not be read for hashing, e.g. {d.missing[0]}")
    if d.degenerate:
        _err(f"imgvec: warning: about {d.share_above:.0%} of all pairs of images are above --threshold {threshold:g}: "
             "the embeddings do not tell these images apart (random weights or an unsuitable backbone?), "
             "so the groups mean little")
    if fmt == "html":
        typer.echo(api.dedup_page(d), nl=False)
        return
    _print(fmt, d)


@_command
def inspect(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed`"),
    fmt: str = FormatOpt,
    html: Optional[Path] = typer.Option(None, "--html", help="also write an HTML report (thumbnails, the map) here"),
    head: Optional[Path] = typer.Option(None, "--head", help="a head trained on this store: its C is used (else "
                                        "chosen by cross-validation, as `imgvec train` does)"),
    split: Optional[str] = typer.Option(None, "--split", help="comma-separated folder names that are splits "
                                        "(default: train, val, test and their usual spellings)"),
    threshold: float = typer.Option(0.95, "--threshold", "-t", help="cosine similarity that makes a near duplicate"),
    k: int = typer.Option(10, "-k", help="neighbours per image for label votes and outlier distances"),
    hash_files: bool = typer.Option(True, "--hash/--no-hash", help="also find identical files by sha256"),
    map_rows: int = typer.Option(api.MAP_ROWS, "--map-rows", help="rows the map lays out at most (a random sample above; "
                                 "0: no map)"),
    stats: bool = typer.Option(False, "--stats", help="first read the images again to record the statistics the "
                               "store lacks (no embedding)"),
    top: int = typer.Option(20, "--top", help="entries per section in the table"),
) -> None:
    """What is wrong with the images: label issues, outliers, leaks, image statistics, and a map."""
    _check_format(fmt)
    api.check_page_path(html, [store])
    splits = [x.strip() for x in split.split(",") if x.strip()] if split else None
    with Reporter() as progress:
        r = api.inspect(store, head=head, k=k, threshold=threshold, splits=splits, check_files=hash_files,
                        map_rows=map_rows or None, stats=stats, progress=progress)
    for line in r.notes:
        _err(f"imgvec: note: {line}")
    _notes([], r.provenance, html, lambda: api.inspect_html(r, html))
    _print(fmt, r, top=top)


@_command
def evaluate(
    head: Path = typer.Argument(..., help="head file made by `imgvec train`"),
    data: Path = typer.Argument(..., help="held-out images (one subfolder per class) or a store of them"),
    fmt: str = typer.Option("table", "--format", "-f", autocompletion=_choices(TABLE_JSON), help="table or json"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write an HTML report here"),
    weights: Optional[str] = typer.Option(None, "--weights", help="where the head's weights file is now, if moved"),
    runtime: str = RuntimeOpt,
    model: Optional[Path] = ModelPathOpt,
) -> None:
    """Score a head on held-out labelled data: accuracy, per-class P/R/F1, confusion matrix."""
    _check_format(fmt, TABLE_JSON)
    api.check_page_path(html, [head, data])
    with Reporter() as progress:
        e = api.evaluate(head, data, weights=weights, runtime=runtime, progress=progress, model=model)
    if e.seen_in_training:
        _err(f"imgvec: WARNING: the head was trained on {e.seen_in_training} of these {e.n_images} images: "
             "this accuracy is NOT a held-out estimate (evaluate on images the head has not seen)")
    _notes(e.skipped, e.provenance, html, lambda: api.evaluation_html(e, html))
    for label, n in e.unknown.items():
        _err(f"imgvec: note: {plural(n, 'image')} labelled {label!r}, a class the head was not trained on, "
             "count as wrong")
    _print(fmt, e)


@_command
def serve(
    store: Path = typer.Argument(..., help="HDF5 store made by `imgvec embed` (and its index, if built)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    runtime: str = RuntimeOpt,
    k: int = typer.Option(10, "-k", help="neighbours per query unless a request asks for another number"),
    max_pixels: int = typer.Option(api.DEFAULT_MAX_PIXELS, "--max-pixels", help="refuse uploaded images larger than this"),
    index_path: Optional[Path] = typer.Option(None, "--index", help="index file (default: STORE.index.h5)"),
    images: Optional[Path] = typer.Option(None, "--images", help="serve images only from below this folder "
                                          "(default: the store file's folder), whatever root the store names"),
    memory_budget: int = typer.Option(1024, "--memory-budget", help="MB that uploads and their decoding may hold "
                                      "at once, all requests together (more waits, then 503; one alone over it: 413)"),
    header_timeout: float = typer.Option(10.0, "--header-timeout", help="seconds a request's headers may take"),
    body_timeout: float = typer.Option(60.0, "--body-timeout", help="seconds an upload's body may take"),
    keep_alive: float = typer.Option(5.0, "--keep-alive", help="seconds an idle connection stays open"),
    max_connections: int = typer.Option(512, "--max-connections", help="open connections at once (at the cap the "
                                        "longest idle one is closed)"),
    map_rows: int = typer.Option(api.MAP_ROWS, "--map-rows", help="rows the page's map lays out at most (a random sample "
                                 "above; 0: no map)"),
) -> None:
    """Serve a store on a web page and a JSON API, the model and index kept loaded (Ctrl-C stops)."""
    from imgvec.service import server

    limits = server.Limits(header_timeout=header_timeout, body_timeout=body_timeout, keep_alive=keep_alive,
                           max_connections=max_connections)
    server.run(store, host=host, port=port, runtime=runtime, k=k, max_pixels=max_pixels, say=_err, index=index_path,
               images=images, memory_budget=memory_budget << 20, limits=limits, map_rows=map_rows)


def main() -> None:
    app(prog_name="imgvec")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
