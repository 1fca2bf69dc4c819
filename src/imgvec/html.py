"""Self-contained HTML pages: query galleries, predictions, duplicate groups, backbone reports.

Every page is one file that can be mailed: thumbnails are embedded as base64 JPEG data URIs
(made with Pillow, aspect ratio kept), styles are inline, plots are hand-written SVG, and
there is no script. Every file name, label and provenance string goes through
``html.escape``. Pages made from random-weight embeddings carry a visible banner.

Functions here take the API's result objects and return a string; :func:`write` saves one.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .images import DEFAULT_MAX_PIXELS, _pil_formats

if TYPE_CHECKING:  # pragma: no cover
    from .api import Evaluation, Predictions, QueryResults
    from .comparison import Comparison
    from .duplicates import DedupResult
    from .provenance import Provenance

THUMB_SIZE = 160
GROUP_THUMBNAILS = 24  # a duplicate group shows this many thumbnails, then lists the rest by name
_cache: dict[tuple[str, int, int], str | None] = {}  # (path, mtime_ns, size) -> data URI

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 24px 24px;color:#1d2330;background:#fafbfc}
header{border-bottom:1px solid #d8dce3;padding:12px 0 8px;margin-bottom:12px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px} h3{font-size:14px;margin:12px 0 4px}
.prov{font-size:12px;color:#4a5262} .prov b{color:#1d2330}
.banner{background:#b3261e;color:#fff;font-weight:700;padding:8px 12px;margin:12px 0 0;border-radius:4px;font-size:14px}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin:4px 0 14px}
figure{margin:0;width:168px;background:#fff;border:1px solid #d8dce3;border-radius:4px;padding:4px;box-sizing:border-box}
figure.query{border:2px solid #1a73e8}
figure img{display:block;margin:0 auto;max-width:160px;max-height:160px}
.missing{width:160px;height:100px;display:flex;align-items:center;justify-content:center;background:#eef0f3;color:#6b7280;font-size:12px}
figcaption{font-size:11px;line-height:1.35;margin-top:3px;word-break:break-all}
.score{font-weight:700;font-size:12px} .label{color:#4a5262}
table{border-collapse:collapse;font-size:13px;margin:4px 0 10px;background:#fff}
th,td{border:1px solid #d8dce3;padding:3px 8px;text-align:right} th{background:#eef0f3}
td.l,th.l{text-align:left}
.cm td{min-width:34px;text-align:center}
.note{font-size:12px;color:#4a5262}
"""


def esc(value: Any) -> str:
    """``html.escape`` of ``str(value)`` (quotes included): safe in text and attributes."""
    return html.escape(str(value), quote=True)


def thumbnail(path: str | os.PathLike[str], size: int = THUMB_SIZE) -> str | None:
    """A JPEG data URI of the image at ``path`` fitted into ``size`` px, or None if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path, formats=_pil_formats()) as im:
            if im.size[0] * im.size[1] > DEFAULT_MAX_PIXELS:
                return None
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (size, size))
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except Exception:  # a gallery must not fail because one file went away or is broken
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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


def _figure(path: str, caption: str, cls: str = "", thumb_path: str | None = None) -> str:
    uri = _cached_thumbnail(thumb_path or path)
    img = (f'<img src="{uri}" alt="{esc(path)}" title="{esc(path)}">' if uri
           else f'<div class="missing" title="{esc(path)}">image not readable</div>')
    return f'<figure class="{cls}">{img}<figcaption>{caption}</figcaption></figure>'


def provenance_html(prov: "Provenance") -> str:
    return (f'<div class="prov"><b>backbone</b> {esc(prov.backbone)} &middot; <b>input</b> {prov.input_size}px '
            f'&middot; <b>weights</b> {esc(prov.weights_spec.describe())} &middot; <b>dim</b> {prov.dim} '
            f'&middot; imgvec {esc(prov.imgvec_version)}, keras {esc(prov.keras_version)}, '
            f'tensorflow {esc(prov.tensorflow_version)} &middot; embeddings made {esc(prov.created)}</div>')


def random_banner(what: str = "These embeddings") -> str:
    return (f'<div class="banner">RANDOM WEIGHTS: {esc(what)} come from a randomly initialised backbone, '
            'not a pretrained one. They show the pipeline working, not real similarity or accuracy.</div>')


def page(title: str, body: str, provenances: Iterable["Provenance"] = (), subtitle: str = "") -> str:
    """A complete HTML document: title, provenance lines, RANDOM banner if any is random."""
    provs = list(provenances)
    header = [f"<h1>{esc(title)}</h1>"]
    if subtitle:
        header.append(f'<div class="prov">{esc(subtitle)}</div>')
    header.extend(provenance_html(p) for p in provs)
    if any(p.is_random for p in provs):
        header.append(random_banner())
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<header>{''.join(header)}</header><main>{body}</main></body></html>\n")


def write(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) via a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# -- galleries ----------------------------------------------------------------------------
def query_page(results: "QueryResults", resolve: Callable[[str], str], title: str = "imgvec query") -> str:
    """Each query image followed by its neighbours, score and label under each thumbnail."""
    parts = []
    for q in results.queries:
        figs = [_figure(q.query, f'<span class="score">query</span><br>{esc(q.query)}', "query")]
        for n in q.results:
            label = f'<br><span class="label">{esc(n.label)}</span>' if n.label else ""
            figs.append(_figure(n.path, f'<span class="score">#{n.rank} &middot; {n.score:.4f}</span>'
                                        f'<br>{esc(n.path)}{label}', thumb_path=resolve(n.path)))
        parts.append(f'<h2>{esc(q.query)}</h2><div class="row">{"".join(figs)}</div>')
    if not results.queries:
        parts.append('<p class="note">No query image could be used.</p>')
    parts.append(_skipped_html(results.skipped))
    k = max((len(q.results) for q in results.queries), default=0)
    sub = f"{len(results.queries)} queries, {k} neighbours each, cosine similarity; {results.index_kind} index"
    return page(title, "".join(parts), [results.provenance], sub)


def predict_page(preds: "Predictions", top: int = 3, title: str = "imgvec predict") -> str:
    """Each image with its predicted label and its ``top`` class probabilities."""
    figs = []
    for p in preds.predictions:
        ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:top]
        probs = "<br>".join(f"{esc(c)} {v:.3f}" for c, v in ranked)
        figs.append(_figure(p.path, f'<span class="score">{esc(p.label)}</span><br>{esc(p.path)}'
                                    f'<br><span class="label">{probs}</span>'))
    body = f'<div class="row">{"".join(figs)}</div>{_skipped_html(preds.skipped)}'
    sub = f"{len(preds.predictions)} images; classes: {', '.join(preds.classes)}"
    return page(title, body, [preds.provenance], sub)


def dedup_page(result: "DedupResult", resolve: Callable[[str], str], title: str = "imgvec dedup") -> str:
    """Each group of duplicates as a row of thumbnails with its similarity to the group's first."""
    parts = []
    for i, g in enumerate(result.groups, 1):
        figs = [_figure(m.path, f'<span class="score">{m.score:.4f}</span><br>{esc(m.path)}',
                        thumb_path=resolve(m.path)) for m in g.members[:GROUP_THUMBNAILS]]
        rest = g.members[GROUP_THUMBNAILS:]
        if rest:
            names = "<br>".join(f"{m.score:.4f} {esc(m.path)}" for m in rest)
            figs.append(f'<div class="note">and {len(rest)} more:<br>{names}</div>')
        what = ("identical files (sha256 " + esc(g.sha256[:12]) + "...)") if g.kind == "exact" else \
            f"near duplicates, cosine &ge; {result.threshold:g}"
        parts.append(f'<h2>group {i}: {len(g.members)} images, {what}</h2><div class="row">{"".join(figs)}</div>')
    if not result.groups:
        parts.append('<p class="note">No duplicates found.</p>')
    if result.missing:
        parts.append(f'<p class="note">{len(result.missing)} files could not be read for hashing.</p>')
    sub = (f"{result.rows} images; {_n(result.exact_groups, 'group')} of identical files, "
           f"{_n(result.near_groups, 'group')} of near duplicates (cosine >= {result.threshold:g}; scores are similarity to the group's first image)")
    return page(title, "".join(parts), [result.provenance], sub)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _skipped_html(skipped: Sequence[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    rows = "".join(f'<tr><td class="l">{esc(p)}</td><td class="l">{esc(r)}</td></tr>' for p, r in skipped)
    return f'<h2>Skipped</h2><table><tr><th class="l">file</th><th class="l">reason</th></tr>{rows}</table>'


# -- tables and plots ---------------------------------------------------------------------
def confusion_html(classes: Sequence[str], matrix: Any, caption: str = "") -> str:
    """A confusion matrix (rows: true class, columns: predicted), cells shaded by row share."""
    rows = []
    for name, counts in zip(classes, matrix):
        total = max(1, int(sum(counts)))
        cells = []
        for j, v in enumerate(counts):
            share = int(v) / total
            hue = "26,115,232" if classes[j] == name else "179,38,30"
            colour = "#fff" if share > 0.55 else "#1d2330"
            cells.append(f'<td style="background:rgba({hue},{share:.2f});color:{colour}">{int(v)}</td>')
        rows.append(f'<tr><th class="l">{esc(name)}</th>{"".join(cells)}</tr>')
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="cm">{cap}<tr><th class="l">true \\ predicted</th>{head}</tr>{"".join(rows)}</table>'


def report_table(classes: Sequence[str], report: dict[str, Any]) -> str:
    """Per-class precision, recall, F1 and support from a scikit-learn ``output_dict`` report."""
    rows = []
    for c in list(classes) + ["macro avg", "weighted avg"]:
        r = report.get(c)
        if r is None:
            continue
        rows.append(f'<tr><td class="l">{esc(c)}</td><td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
                    f'<td>{r["f1-score"]:.3f}</td><td>{int(r["support"])}</td></tr>')
    return ('<table><tr><th class="l">class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>'
            f'{"".join(rows)}</table>')


def scatter_svg(points: Sequence[tuple[str, float, float, float]], x_label: str, y_label: str,
                width: int = 640, height: int = 380) -> str:
    """A scatter plot with vertical error bars: ``(name, x, y, y_error)``; x on a log scale."""
    left, right, top, bottom = 64, 24, 16, 48
    xs = [max(p[1], 1e-9) for p in points] or [1.0]
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.12
    lo, hi = lo - pad, hi + pad
    y_lo = max(0.0, min((y - e for _, _, y, e in points), default=0.0) - 0.05)
    y_hi = max((y + e for _, _, y, e in points), default=1.0) + 0.05
    if y_hi - y_lo < 0.1:
        y_hi = y_lo + 0.1
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (math.log10(max(x, 1e-9)) - lo) / (hi - lo) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(y_label)} against {esc(x_label)}" style="background:#fff;border:1px solid #d8dce3">']
    for i in range(6):  # horizontal grid and y ticks (accuracy never above 1)
        y = y_lo + (min(y_hi, 1.0) - y_lo) * i / 5
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eef0f3"/>'
                   f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{y:.3g}</text>')
    ticks = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
             if lo <= math.log10(m * 10.0 ** e) <= hi]
    if len(ticks) < 3:  # a narrow range: five evenly spaced (in log) ticks instead of 1-2-5 steps
        ticks = [float(f"{10 ** (lo + (hi - lo) * i / 4):.3g}") for i in range(5)]
    for x in ticks:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#eef0f3"/>'
                   f'<text x="{sx(x):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{x:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#9aa1ad"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" font-size="12" text-anchor="middle">{esc(x_label)}</text>')
    out.append(f'<text transform="translate(16,{top + ph / 2}) rotate(-90)" font-size="12" '
               f'text-anchor="middle">{esc(y_label)}</text>')
    for name, x, y, err in points:
        cx, cy = sx(x), sy(y)
        out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{sy(min(y_hi, y + err)):.1f}" '
                   f'y2="{sy(max(y_lo, y - err)):.1f}" stroke="#1a73e8" stroke-width="1.5"/>'
                   f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="#1a73e8"><title>{esc(name)}: '
                   f'{y:.3f} &#177; {err:.3f} at {x:.1f}</title></circle>'
                   + (f'<text x="{cx - 8:.1f}" y="{cy - 6:.1f}" font-size="12" text-anchor="end">{esc(name)}</text>'
                      if cx > left + pw * 0.6 else
                      f'<text x="{cx + 8:.1f}" y="{cy - 6:.1f}" font-size="12">{esc(name)}</text>'))
    out.append("</svg>")
    return "".join(out)


def compare_page(cmp: "Comparison", title: str = "imgvec compare") -> str:
    """The comparison table, an accuracy-vs-speed plot and a confusion matrix per backbone."""
    head = ("<tr><th class=\"l\">backbone</th><th>parameters</th><th>embedding size</th><th>images/s</th>"
            "<th>CV accuracy</th><th>&#177; std</th><th class=\"l\">weakest class (F1)</th></tr>")
    rows = []
    for r in cmp.rows:
        weakest = f"{esc(r.weakest_class)} ({r.weakest_f1:.3f})"
        rows.append(f'<tr><td class="l">{esc(r.backbone)}</td><td>{r.params:,}</td><td>{r.dim}</td>'
                    f'<td>{r.images_per_second:.1f}</td><td>{r.accuracy:.3f}</td><td>{r.accuracy_std:.3f}</td>'
                    f'<td class="l">{weakest}</td></tr>')
    body = [f"<h2>Summary</h2><table>{head}{''.join(rows)}</table>",
            f'<p class="note">{cmp.cv}-fold stratified cross-validation (random_state {cmp.random_state}), the same '
            f"folds for every backbone, on {cmp.n_images} images in {len(cmp.classes)} classes. Images/s: "
            f"decoding and inference on this machine ({esc(cmp.machine)}), after warm-up.</p>",
            "<h2>Accuracy against speed</h2>",
            scatter_svg([(r.backbone, r.images_per_second, r.accuracy, r.accuracy_std) for r in cmp.rows],
                        "images per second (log scale)", "cross-validated accuracy")]
    for r in cmp.rows:
        body.append(f"<h2>{esc(r.backbone)}</h2>")
        body.append(confusion_html(cmp.classes, r.confusion, "out-of-fold predictions"))
        body.append(report_table(cmp.classes, r.report))
    sub = f"{len(cmp.rows)} backbones on {cmp.source}"
    return page(title, "".join(body), [r.provenance for r in cmp.rows], sub)


def evaluation_page(ev: "Evaluation", title: str = "imgvec evaluate") -> str:
    body = (f"<h2>Accuracy {ev.accuracy:.3f} on {ev.n_images} images</h2>"
            + confusion_html(ev.labels, ev.confusion) + report_table(ev.labels, ev.report))
    return page(title, body, [ev.provenance], f"head {ev.head} on {ev.data}")
