"""Self-contained HTML pages: query galleries, predictions, duplicate groups, backbone reports.

Every page is one file that can be mailed: thumbnails are embedded as base64 JPEG data URIs
(made with Pillow, aspect ratio kept), styles are inline, plots are SVG, and there is no script.
Pages are rendered from the Jinja2 templates in ``imgvec/templates`` with autoescaping on, so
every file name, label and provenance value is escaped by the engine, not by each caller; before
that, every value passes :func:`imgvec.pages.report.shown` (control characters and bytes that are not
UTF-8 made visible, never dropped, never a failed write).
Pages made from random-weight embeddings carry a visible banner.

Functions here take result objects (:mod:`imgvec.results`) and return a string; :func:`write` saves one.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Sequence

from imgvec.fileio import open_regular, write_text
from imgvec.files.images import DEFAULT_MAX_PIXELS, pil_formats, key_for
from imgvec.pages.report import shown
from imgvec.results import plural

if TYPE_CHECKING:  # pragma: no cover
    import jinja2

    from imgvec.files.provenance import Provenance
    from imgvec.results import Comparison, DedupResult, Evaluation, InspectResult, Predictions, QueryResults

THUMB_SIZE = 160
GROUP_THUMBNAILS = 24  # a duplicate group shows this many thumbnails, then lists the rest by name
QUERY_COLUMNS = 11  # a query and its neighbours share one row of up to this many cards (a query and k=10)
_cache: dict[tuple[str, int, int], str | None] = {}  # (path, mtime_ns, size) -> data URI


@functools.lru_cache(maxsize=1)
def environment() -> "jinja2.Environment":
    """The template environment: autoescaping on for every template, undefined names an error."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("imgvec.pages", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False,
                             finalize=_shown)
    env.filters["wbr"] = _break_after_slashes
    return env


def _shown(value: Any) -> Any:
    """Every value a template prints, made safe to show (markup the templates made themselves is left alone)."""
    from markupsafe import Markup

    return value if isinstance(value, Markup) or not isinstance(value, (str, os.PathLike)) else shown(value)


def _break_after_slashes(path: Any) -> Any:
    """``path`` escaped, with a line-break opportunity after each '/' (long paths wrap at folders)."""
    from markupsafe import Markup, escape

    return Markup("/<wbr>").join(escape(part) for part in shown(path).split("/"))


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def thumbnail(path: str | os.PathLike[str], size: int = THUMB_SIZE) -> str | None:
    """A JPEG data URI of the image at ``path`` fitted into ``size`` px, or None if unreadable.

    Only regular files are opened (a FIFO or a link to a device shows as missing, never hangs).
    """
    try:
        with open_regular(path) as fh:
            jpeg = thumbnail_jpeg(fh, size)
    except Exception:  # a gallery must not fail because one file went away or is broken
        return None
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnail_jpeg(fh: BinaryIO, size: int = THUMB_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | None:
    """The image read from ``fh`` fitted into ``size`` px as JPEG bytes; None when over ``max_pixels``.

    Decoding errors are raised (Pillow's). Only imgvec's image formats are decoded.
    """
    from PIL import Image, ImageOps

    with Image.open(fh, formats=pil_formats()) as im:
        if im.size[0] * im.size[1] > max_pixels:
            return None
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (size, size))
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _cached_thumbnail(path: str) -> str | None:
    """:func:`thumbnail`, computed once per file version (an image often recurs as a neighbour)."""
    try:
        key = (os.path.abspath(path), os.stat(path).st_mtime_ns, THUMB_SIZE)
    except OSError:
        return None
    if key not in _cache:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = thumbnail(path)
    return _cache[key]


def card(path: str, thumb_path: str | None = None, cls: str = "", **fields: Any) -> dict[str, Any]:
    """What a template needs to draw one image: its thumbnail (None: unreadable), its name, its figure class."""
    return dict(uri=_cached_thumbnail(thumb_path or path), path=path, cls=cls, **fields)


def write(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) atomically."""
    return write_text(path, text)


def _page(template: str, title: str, provenances: Iterable["Provenance"], subtitle: Sequence[str],
          **context: Any) -> str:
    return render(template, title=title, provenances=list(provenances), subtitle=list(subtitle), **context)


# -- galleries ----------------------------------------------------------------------------
def query_page(results: "QueryResults", resolve: Callable[[str], str], root: str | None = None,
               title: str = "imgvec query") -> str:
    """Each query image and its neighbours in one row: score, path (relative to the store root) and label."""
    queries = []
    for q in results.queries:
        name = q.query
        if root:
            key = key_for(os.path.abspath(q.query), root)
            name = key if not os.path.isabs(key) else q.query
        cards = [card(name, q.query, cls="query", head="query", label="")]
        cards += [card(n.path, resolve(n.path), head=f"#{n.rank} · {n.score:.4f}", label=n.label) for n in q.results]
        queries.append(dict(name=name, cards=cards, columns=min(len(cards), QUERY_COLUMNS)))
    k = max((len(q.results) for q in results.queries), default=0)
    sub = [f"{plural(len(results.queries), 'query', 'queries')}, {k} neighbours each, cosine similarity; {results.search}"
           + (f"; paths relative to {root}" if root else "")]
    return _page("query.html", title, [results.provenance], sub, queries=queries, skipped=results.skipped)


def predict_page(preds: "Predictions", top: int = 3, title: str = "imgvec predict") -> str:
    """Each image with its predicted label, its true label where its folder names one, and ``top`` probabilities."""
    cards = []
    for p in preds.predictions:
        ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:top]
        cls = "" if p.correct is None else ("right" if p.correct else "wrong")
        cards.append(card(p.path, cls=cls, predicted=p.label, truth=p.truth, correct=p.correct, top=ranked))
    head = f"head {preds.head}: " if preds.head else "head: "
    sub = [f"{plural(len(preds.predictions), 'image')}; " + head + f"{len(preds.classes)} classes ({', '.join(preds.classes)}), "
           f"C={preds.C:.4g}, cross-validated accuracy {preds.cv_accuracy:.3f} ± {preds.cv_accuracy_std:.3f} "
           "on its training store"]
    labelled = preds.labelled
    return _page("predict.html", title, [preds.provenance], sub, cards=cards, skipped=preds.skipped,
                 accuracy=preds.accuracy, n_labelled=len(labelled), n_right=sum(bool(p.correct) for p in labelled))


def dedup_page(result: "DedupResult", resolve: Callable[[str], str], title: str = "imgvec dedup") -> str:
    """Each group of duplicates as a row of thumbnails with its similarity to the group's first."""
    groups = []
    for g in result.groups:
        groups.append(dict(size=len(g.members), found_by=result.found_by(g), sha256=g.sha256,
                           cards=[card(m.path, resolve(m.path), score=m.score, copies=result.copies_of(g, m) or 0)
                                  for m in g.members[:GROUP_THUMBNAILS]],
                           rest=g.members[GROUP_THUMBNAILS:]))
    sub = [f"{plural(result.rows, 'image')}; {plural(result.exact_groups, 'group')} of identical files, "
           f"{plural(result.near_groups, 'group')} of near duplicates (cosine >= {result.threshold:g}); "
           "scores are similarity to the group's first image"]
    warning = (f"About {result.share_above:.0%} of all pairs of images are above the threshold {result.threshold:g}: "
               "the embeddings do not tell these images apart (random weights or an unsuitable backbone?), so the "
               "groups mean little." if result.degenerate else "")
    return _page("dedup.html", title, [result.provenance], sub, groups=groups, missing=len(result.missing),
                 warning=warning)


# -- tables and plots ---------------------------------------------------------------------
def confusion_cells(labels: Sequence[str], matrix: Any) -> list[tuple[str, list[tuple[int, str, str]]]]:
    """Rows of (true label, cells); a cell is (count, rgba, text colour), shaded by its share of the row."""
    rows = []
    for name, counts in zip(labels, matrix):
        total = max(1, int(sum(counts)))
        cells = []
        for j, v in enumerate(counts):
            share = int(v) / total
            hue = "26,115,232" if labels[j] == name else "179,38,30"
            cells.append((int(v), f"{hue},{share:.2f}", "#fff" if share > 0.55 else "#1d2330"))
        rows.append((name, cells))
    return rows


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values (multiples of 1, 2, 2.5 or 5 times a power of ten) between ``lo`` and ``hi``."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def scatter_svg(points: Sequence[tuple[str, float, float, float]], x_label: str, y_label: str,
                width: int = 640, height: int = 380, lines: Sequence[tuple[str, float]] = ()) -> str:
    """A scatter plot with vertical error bars: ``(name, x, y, y_error)``; x on a log scale.

    ``lines`` are labelled horizontal reference lines (a chance level). Ticks sit at round values.
    """
    left, right, top, bottom = 64, width - 24, 16, height - 48
    xs = [max(p[1], 1e-9) for p in points] or [1.0]
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.12
    lo, hi = lo - pad, hi + pad
    ys = [y - e for _, _, y, e in points] + [y for _, y in lines]
    y_hi_data = max([y + e for _, _, y, e in points] + [y for _, y in lines], default=1.0)
    y_ticks = nice_ticks(max(0.0, min(ys, default=0.0) - 0.05), min(1.0, y_hi_data + 0.05))
    step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 0.1
    y_lo = max(0.0, min(y_ticks[0], min(ys, default=0.0)))
    y_hi = max(y_ticks[-1], y_hi_data)
    if y_hi - y_lo < step:
        y_hi = y_lo + step

    def sx(x: float) -> float:
        return round(left + (math.log10(max(x, 1e-9)) - lo) / (hi - lo) * (right - left), 1)

    def sy(y: float) -> float:
        return round(top + (1 - (y - y_lo) / (y_hi - y_lo)) * (bottom - top), 1)

    x_ticks = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
               if lo <= math.log10(m * 10.0 ** e) <= hi]
    if len(x_ticks) < 3:  # a narrow range: round steps in between
        x_ticks = [t for t in nice_ticks(10 ** lo, 10 ** hi, 4) if t > 0]
    plotted = []
    for name, x, y, err in points:
        cx = sx(x)
        plotted.append(dict(name=name, x=cx, y=sy(y), y_hi=sy(min(y_hi, y + err)), y_lo=sy(max(y_lo, y - err)),
                            title=f"{name}: {y:.3f} ± {err:.3f} at {x:.1f}", anchor_end=cx > left + (right - left) * 0.6,
                            label_x=cx - 8 if cx > left + (right - left) * 0.6 else cx + 8))
    return render("scatter.svg", width=width, height=height, left=left, right=right, top=top, bottom=bottom,
                  x_label=x_label, y_label=y_label, points=plotted,
                  y_ticks=[dict(pos=sy(t), text=f"{t:g}") for t in y_ticks if y_lo <= t <= y_hi],
                  x_ticks=[dict(pos=sx(t), text=f"{t:g}") for t in x_ticks],
                  lines=[dict(pos=sy(y), text=f"{text} {y:.3f}") for text, y in lines])


def compare_page(cmp: "Comparison", title: str = "imgvec compare") -> str:
    """The comparison table with chance rows, an accuracy-vs-speed plot and a confusion matrix per backbone."""
    from markupsafe import Markup

    majority = [b for b in cmp.chance if b.name == "majority_class"]
    plot = scatter_svg([(r.backbone, r.images_per_second, r.accuracy, r.accuracy_std) for r in cmp.rows],
                       "images per second (log scale)", "cross-validated accuracy",
                       lines=[("chance (most common class)", b.accuracy) for b in majority])
    sub = [f"{len(cmp.rows)} backbones on {cmp.source}"]
    return _page("compare.html", title, [r.provenance for r in cmp.rows], sub, cmp=cmp,
                 plot=Markup(plot),  # rendered by the same autoescaping environment
                 confusions=[confusion_cells(cmp.classes, r.confusion) for r in cmp.rows])


def evaluation_page(ev: "Evaluation", title: str = "imgvec evaluate") -> str:
    """Accuracy beside chance, the confusion matrix and per-class scores of a head on held-out data."""
    return _page("evaluate.html", title, [ev.provenance], [f"head {ev.head} on {ev.data}"], ev=ev,
                 confusion=confusion_cells(ev.labels, ev.confusion))


# -- inspect ------------------------------------------------------------------------------
SECTION_CARDS = 48  # thumbnails per section of the inspect report; the rest are counted
MAP_SIZE = 640
PALETTE = ("#1a73e8", "#e8710a", "#1e8e3e", "#9334e6", "#d01884", "#12b5cb", "#7a5c00", "#f9ab00", "#188038",
           "#a142f4", "#80868b", "#4285f4")  # class colours; rings (red, black, grey dashed) mark reported images


NO_LABEL_COLOUR = "#9aa1ad"


def label_colours(labels: Iterable[str]) -> dict[str, str]:
    """Each label's colour on a map (the report's and the service page's): the palette in the labels' sorted
    order, grey for no label (``""``)."""
    names = sorted(set(labels) - {""})
    return {**{n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}, "": NO_LABEL_COLOUR}


def map_svg(result: "InspectResult", marked: dict[str, str], size: int = MAP_SIZE) -> str:
    """The map as an SVG scatter: one dot per row drawn, coloured by label, reported images ringed."""
    layout = result.map
    assert layout is not None
    names = sorted(set(result.map_labels) - {""})
    colour = label_colours(names)
    pad = 8
    points = []
    for (x, y), key, label in zip(layout.xy.tolist(), result.map_paths, result.map_labels):
        ring = marked.get(key, "")
        points.append(dict(x=round(pad + x * (size - 2 * pad), 1), y=round(pad + (1 - y) * (size - 2 * pad), 1),
                           colour=colour[label], ring=ring.split()[0] if ring else "", dashed=ring.endswith("dashed"),
                           title=f"{key} ({label or 'no label'})"))
    points.sort(key=lambda p: bool(p["ring"]))  # reported images drawn last, on top
    legend = [dict(name=n, colour=colour[n]) for n in names[:30]]
    if "" in result.map_labels:
        legend.append(dict(name="no label", colour=colour[""]))
    return render("map.svg", size=size, points=points, legend=legend)


def inspect_page(result: "InspectResult", resolve: Callable[[str], str], title: str = "imgvec inspect") -> str:
    """Every section of ``result`` as thumbnails with scores (sections with nothing say so), and the map."""
    from markupsafe import Markup

    def section(id: str, title: str, items: list[Any], make: Callable[[Any], dict[str, Any]], empty: str) -> dict:
        return dict(id=id, title=title, count=len(items), method=result.methods.get(id, ""),
                    not_run=result.skipped_sections.get(id, ""), empty=empty,
                    cards=[make(x) for x in items[:SECTION_CARDS]], rest=max(0, len(items) - SECTION_CARDS))

    def issue(i: Any) -> dict:
        return card(i.path, resolve(i.path), score=i.score, other=None,
                    lines=[("bad", f"{i.label} → {i.suggested}?"),
                           ("label", f"head {i.self_confidence:.2f}, neighbours {i.neighbours_agree:.0%} agree")])

    def outlier(o: Any) -> dict:
        return card(o.path, resolve(o.path), score=o.score, other=None,
                    lines=[("label", o.label or "no label"), ("label", f"neighbour distance {o.neighbour_distance:.3f}"
                           + ("" if o.class_distance is None else f", class {o.class_distance:.3f}"))])

    def leak(x: Any) -> dict:
        where = (x.split, x.other_split) if x.across == "split" else (x.label, x.other_label)
        return card(x.path, resolve(x.path), score=x.score,
                    lines=[("bad", f"{'identical file' if x.kind == 'exact' else 'near duplicate'} across "
                                   f"{'splits' if x.across == 'split' else 'class folders'}"),
                           ("label", f"{where[0] or '-'} / {where[1] or '-'}")],
                    other=card(x.other, resolve(x.other), caption="its copy"))

    def flagged(f: Any) -> dict:
        s = f.stats
        return card(f.path, resolve(f.path), score=f.score, other=None,
                    lines=[("bad", ", ".join(f.flags)),
                           ("label", f"{s['width']:.0f}x{s['height']:.0f}, brightness {s['brightness']:.0f}, "
                                     f"contrast {s['contrast']:.0f}, sharpness {s['sharpness']:.0f}")])

    stats_empty = "No image is dark, bright, blurry, tiny or of an extreme aspect."
    if result.stats_missing and "image_stats" not in result.skipped_sections:
        stats_empty += f" ({result.stats_missing} images have no statistics: `imgvec inspect --stats` adds them.)"
    sections = [
        section("label_issues", "Label issues", result.label_issues, issue, "No label issues found."),
        section("outliers", "Outliers", result.outliers, outlier, "No outliers found."),
        section("leaks", "Leaks across splits and class folders", result.leaks, leak,
                "No duplicates across splits or class folders."),
        section("image_stats", "Image statistics", result.image_stats, flagged, stats_empty),
    ]
    marked: dict[str, str] = {}
    for colour, keys in (("#5f6368 dashed", [x.path for x in result.leaks] + [x.other for x in result.leaks]),
                         ("#000", [o.path for o in result.outliers]), ("#b3261e", [i.path for i in result.label_issues])):
        marked.update(dict.fromkeys(keys, colour))
    plot = Markup(map_svg(result, marked)) if result.map is not None else ""
    sub = [f"{plural(result.rows, 'image')}, {plural(result.labelled, 'labelled image')} in "
           f"{plural(len(result.classes), 'class', 'classes')}; paths relative to {result.root}"]
    summary = (f"{len(result.label_issues)} label issues, {len(result.outliers)} outliers, {len(result.leaks)} leaks, "
               f"{len(result.image_stats)} flagged images; most suspicious first in each section; {result.seconds:.1f}s")
    return _page("inspect.html", title, [result.provenance], sub, sections=sections, summary=summary,
                 notes=result.notes, map_svg=plot,
                 map_method=result.methods.get("map", "No map (too few rows, or not asked for)."))
