"""The self-contained HTML report: images inlined as base64 PNG, charts as inline SVG.

The file needs nothing else to open (no script, no stylesheet, no network), so it can be
mailed or archived next to the synthetic set it describes.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np
from PIL import Image

from common.images import to_uint8
from server.evaluation.fidelity import intensity_histogram
from server.evaluation.image_sets import ImageSet
from server.evaluation.memorisation import DISTANCE_BINS, ClosestPair
from server.evaluation.svg_plots import line_chart

TILE_PX = 80  # tiles are upscaled (nearest) to at least this size: 32 px slices are unreadable otherwise
SAMPLES_PER_ROW = 8
_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:90%}
figure{display:inline-block;margin:4px;text-align:center;font-size:11px}img{image-rendering:pixelated}"""


@dataclass
class ReportFigures:
    """What the HTML shows besides report.json: the images and the raw distances."""

    synthetic: ImageSet
    real_test: ImageSet
    real_train: ImageSet | None = None
    closest_pairs: list[ClosestPair] = field(default_factory=list)
    distances: dict[str, np.ndarray] = field(default_factory=dict)


def png_data_uri(tiles: Sequence[np.ndarray], columns: int | None = None, gap: int = 2) -> str:
    """A grid of ``(S, S)`` images in [-1, 1] as a ``data:image/png;base64`` URI."""
    columns = columns or max(1, len(tiles))
    size = int(tiles[0].shape[-1])
    scale = max(1, -(-TILE_PX // size))
    cell = size * scale + gap
    rows = -(-len(tiles) // columns)
    sheet = Image.new("L", (columns * cell - gap, rows * cell - gap), 255)
    for i, tile in enumerate(tiles):
        img = Image.fromarray(to_uint8(np.asarray(tile).reshape(size, size))).resize((size * scale,) * 2, Image.Resampling.NEAREST)
        sheet.paste(img, ((i % columns) * cell, (i // columns) * cell))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _samples_section(fig: ReportFigures) -> str:
    rows = []
    for label, name in enumerate(fig.synthetic.classes):
        cells = []
        for title, images in (("synthetic", fig.synthetic), ("real (held-out)", fig.real_test)):
            members = images.images[images.labels == label][:SAMPLES_PER_ROW]
            if len(members):
                cells.append(f'<figure><img src="{png_data_uri(list(members[:, 0]))}" alt="{escape(title)} {escape(name)}">'
                             f"<figcaption>{escape(title)}</figcaption></figure>")
        rows.append(f"<h3>{escape(name)}</h3>" + "".join(cells))
    return "<h2>Samples</h2>" + "".join(rows)


def _summary_rows(report: dict) -> list[tuple[str, object]]:
    fid, div, util, mem = (report.get(k) or {} for k in ("fidelity", "diversity", "utility", "memorisation"))
    rows = [("FID (feature network of this report)", fid.get("fid")),
            ("intensity histogram W1", fid.get("histogram_distance")),
            ("MS-SSIM within class, synthetic", div.get("ms_ssim_synthetic")),
            ("MS-SSIM within class, real", div.get("ms_ssim_real")),
            ("TSTR accuracy", util.get("tstr_accuracy")),
            ("TSTR balanced accuracy", util.get("tstr_balanced_accuracy")),
            (f"TSTR balanced accuracy, SD over {util.get('classifier_repeats', 1)} classifier seeds",
             util.get("tstr_balanced_accuracy_sd")),
            ("TRTR accuracy", util.get("trtr_accuracy")),
            ("TSTR / TRTR", util.get("ratio")),
            ("majority-class accuracy", util.get("chance_accuracy"))]
    if mem:
        rows += [("memorisation: fraction below baseline 1st percentile", mem.get("fraction_below_p1")),
                 ("memorisation: exact copies", mem.get("exact_copies"))]
    return rows


def _memorisation_section(report: dict, fig: ReportFigures) -> str:
    mem = report.get("memorisation")
    if not mem or fig.real_train is None:
        return "<h2>Memorisation</h2><p class='note'>Not computed: give --real-train (the images the model was trained on).</p>"
    hist = {}
    for name, key in (("synthetic→train", "synthetic"), ("held-out→train", "baseline")):
        counts, edges = np.histogram(fig.distances[key], bins=DISTANCE_BINS, range=(0.0, max(1e-3, float(np.max(
            np.concatenate([fig.distances["synthetic"], fig.distances["baseline"]]))))))
        hist[name] = [[float(e), float(c) / max(1, counts.sum())] for e, c in zip(edges[:-1], counts)]
    chart = line_chart(hist, "nearest-training-image distance", "1 - Pearson r", "share of images", step=True)
    pairs = "".join(
        f'<figure><img src="{png_data_uri([fig.synthetic.images[p.synthetic_index, 0], fig.real_train.images[p.train_index, 0]])}">'
        f"<figcaption>d={p.distance:.4f}, SSIM={p.ssim:.3f}<br>{escape(fig.synthetic.names[p.synthetic_index][-28:])}"
        f"<br>{escape(fig.real_train.names[p.train_index][-28:])}</figcaption></figure>" for p in fig.closest_pairs)
    levels = mem["quantile_levels"]
    table = _table(["distance quantile"] + [f"q{lv:g}" for lv in levels],
                   [["synthetic→train", *mem["synthetic_quantiles"]], ["held-out→train (baseline)", *mem["baseline_quantiles"]]])
    return (f"<h2>Memorisation</h2><p>Baseline 1st percentile: {_fmt(mem['baseline_p1'])}; synthetic images below it: "
            f"{mem['count_below_p1']} of {mem['num_synthetic']} ({_fmt(mem['fraction_below_p1'])}).</p>{table}{chart}"
            f"<h3>Closest pairs (synthetic | training)</h3>{pairs}")


def _training_section(report: dict) -> str:
    curves = report.get("training")
    if not curves:
        return ""
    loss = line_chart({"train (aggregate)": curves["train_loss"], "validation": curves["val_loss"]},
                      "diffusion loss per round", "round", "loss")
    eps = line_chart(curves["epsilon"], "epsilon per site", "round", "epsilon")
    return f"<h2>Training</h2><p class='note'>{escape(curves['metrics_file'])}</p>{loss}{eps}"


def render_html(report: dict, fig: ReportFigures) -> str:
    """The whole report as one HTML string."""
    fid, div, util = report["fidelity"], report["diversity"], report["utility"]
    classes = fig.synthetic.classes
    histograms = {}
    for name, images in (("synthetic", fig.synthetic), ("real (held-out)", fig.real_test)):
        density, edges = intensity_histogram(images.images)
        histograms[name] = [[float(e), float(d)] for e, d in zip(edges[:-1], density)]
    per_class = _table(["class", "synthetic", "real test", "FID", "MS-SSIM synthetic", "MS-SSIM real"],
                       [[c, report["inputs"]["synthetic_counts"].get(c), report["inputs"]["real_test_counts"].get(c),
                         fid["fid_per_class"].get(c), div["per_class_synthetic"].get(c), div["per_class_real"].get(c)]
                        for c in classes])
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedsynth evaluation</title><style>{_STYLE}</style></head><body>",
        "<h1>fedsynth evaluation report</h1>",
        f"<p class='note'>synthetic: {escape(report['inputs']['synthetic'])}<br>real test: {escape(report['inputs']['real_test'])}"
        f"<br>real train: {escape(str(report['inputs'].get('real_train')))}<br>image size {report['inputs']['image_size']} px; "
        f"feature network {escape(report['feature_network']['cache_key'][:12])} trained on {escape(report['feature_network']['trained_on'])}</p>",
        "<h2>Summary</h2>", _table(["metric", "value"], _summary_rows(report)),
        "<h2>Per class</h2>", per_class,
        line_chart(histograms, "pixel intensity histogram", "intensity (model units)", "share of pixels", step=True),
        f"<p class='note'>MS-SSIM kernel {div['kernel_size']}, {len(div['weights'])} scales. TSTR balanced accuracy "
        f"{_fmt(util.get('tstr_balanced_accuracy'))}, TRTR balanced accuracy {_fmt(util.get('trtr_balanced_accuracy'))}.</p>",
        _samples_section(fig), _memorisation_section(report, fig), _training_section(report),
        "<h2>report.json</h2><details><summary>show</summary><pre>"
        + escape(json.dumps(report, indent=1)) + "</pre></details></body></html>",
    ]
    return "".join(parts)
