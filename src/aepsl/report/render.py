"""Rendering a run's report: one self-contained HTML page from a `RunReport`.

The page opens offline and still works when moved on its own: images are embedded as base64
`data:image/png` URIs, loss curves are inline SVG, the style sheet is inline, and there is no
JavaScript. A stage that has not run shows "not run" and a missing picture a grey "—" cell.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from aepsl.ceiling import ceiling_line
from aepsl.config import Config
from aepsl.data.datasets import Sample, load_image
from aepsl.errors import UserError
from aepsl.io import read_gray_png, read_image, read_index_png
from aepsl.labelmap import PALETTE, colourise
from aepsl.report.read import RunReport
from aepsl.runtime import effective_precision

THUMB = 256  # longest side of an embedded picture, in pixels
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def render(report: RunReport) -> str:
    """The whole page."""
    out = report.run.out
    classes = report.data.classes if report.data else []
    parts = [
        _header(report),
        _health(report),
        _mine_section(report),
        _labels_section(report),
        _train_section(report),
        _train_images_section(report),
        _val_images_section(report),
        _legend(classes),
    ]
    return _page(f"AE-PSL report: {out.name or out}", "\n".join(parts))


# ------------------------------------------------------------------ charts


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """At most `limit` points: bucket means, so a long noisy curve stays readable and small."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / limit)
    return [
        (
            float(np.mean([p[0] for p in points[i : i + size]])),
            float(np.mean([p[1] for p in points[i : i + size]])),
        )
        for i in range(0, len(points), size)
    ]


def _tick(x: float) -> str:
    """Iterations print whole (1200, not 1.2e+03); losses with three significant digits."""
    if x == int(x) and abs(x) < 1e7:
        return str(int(x))
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def svg_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str = "iteration",
    width: int = 640,
    height: int = 260,
) -> str:
    """An inline SVG line chart of named (x, y) series, with axes, min/max ticks and a legend."""
    clean = {
        name: _thin([(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)], 800)
        for name, pts in series.items()
    }
    clean = {name: pts for name, pts in clean.items() if pts}
    if not clean:
        return f'<p class="missing">{html.escape(title)}: no scalars logged</p>'
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 56, 12, 26, 54
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="chart-title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>',
    ]
    for k in range(5):  # horizontal grid lines with y ticks
        value = y0 + (y1 - y0) * k / 4
        y = py(value)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
            f"{_tick(value)}</text>"
        )
    for value in (x0, (x0 + x1) / 2, x1):
        parts.append(
            f'<text x="{px(value):.1f}" y="{top + plot_h + 14}" class="tick" '
            f'text-anchor="middle">{_tick(value)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 28}" class="tick" '
        f'text-anchor="middle">{html.escape(x_label)}</text>'
    )
    legend_x = left
    for index, (name, pts) in enumerate(clean.items()):
        colour = COLOURS[index % len(COLOURS)]
        if len(pts) == 1:
            parts.append(
                f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{colour}"/>'
            )
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                'stroke-width="1.5" stroke-linejoin="round"/>'
            )
        label = html.escape(name)
        legend_y = height - 14
        parts.append(
            f'<rect x="{legend_x}" y="{legend_y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{legend_y + 9}" class="legend">{label}</text>'
        )
        legend_x += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------ pictures


def png_data_uri(image: np.ndarray | Image.Image, label_map: bool = False) -> str:
    """A `data:image/png;base64,...` URI of an image shrunk to at most THUMB pixels a side."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if max(image.size) > THUMB:
        scale = THUMB / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(
            size, Image.Resampling.NEAREST if label_map else Image.Resampling.LANCZOS
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _label_image(labels: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    image.putpalette(PALETTE)
    return image


def _img(uri: str, alt: str, label_map: bool = False) -> str:
    cls = "panel label" if label_map else "panel"
    return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt)}">'


def _missing(reason: str) -> str:
    return f'<div class="nopanel" title="{html.escape(reason)}">—</div>'


def _cell(load: Any, alt: str, label_map: bool = False) -> str:
    """A table cell showing `load()` (an array or PIL image); a grey "—" when it cannot."""
    try:
        image = load()
    except (UserError, OSError, ValueError) as exc:
        return f"<td>{_missing(str(exc))}</td>"
    if image is None:
        return f"<td>{_missing('not available')}</td>"
    return f"<td>{_img(png_data_uri(image, label_map), alt, label_map)}</td>"


def _file(path: Path | None, reader: Any) -> Any:
    """A loader for `_cell`: `reader(path)` when the file exists, else None."""
    return lambda: reader(path) if path is not None and path.is_file() else None


def _index_file(path: Path | None) -> Any:
    return _file(path, lambda p: _label_image(read_index_png(p)))


def _vis_third(path: Path, index: int) -> np.ndarray | None:
    """Panel `index` of a mine vis PNG (erased image | CAM | regions side by side)."""
    if not path.is_file():
        return None
    vis = read_image(path)
    width = vis.shape[1] // 3
    return vis[:, index * width : (index + 1) * width]


def _image(sample: Sample) -> Any:
    return lambda: load_image(sample) if sample.image.is_file() else None


# ------------------------------------------------------------------ sections


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "—" if not math.isfinite(x) else f"{x:.{digits}f}"
    return html.escape(str(x))


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _table(head: list[str], rows: list[list[str]], cls: str = "metrics") -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


def _not_run(what: str) -> str:
    return f'<p class="missing">not run ({html.escape(what)} not found)</p>'


def _mine_length(config: Config, log: dict | None) -> str:
    """The steps asked for and what step 1 trained (mine.min_positives may raise the epochs)."""
    if not log or "iterations" not in log:
        return f"{config.mine.steps} (not trained yet)"
    return f"{config.mine.steps}; {log['epochs']} epochs, {log['iterations']} iterations each"


def _train_length(config: Config, log: dict | None) -> str:
    """The iterations trained, from train.json; before training, what the config asks for."""
    cfg = config.train
    if not log or "iterations" not in log:
        asked = f"{cfg.epochs:g} epochs" if cfg.epochs is not None else f"{cfg.iterations} it"
        return f"not trained yet ({asked} set)"
    text = f"{log['iterations']} iterations"
    if log.get("images"):
        text += f" of {log['batch_size']} crops, {log['images']} images"
    if log.get("epochs"):
        text += f" ({log['epochs']:g} epochs)"
    return text


def _header(report: RunReport) -> str:
    config, out, data_error = report.config, report.run.out, report.data_error
    summary = [
        ("run folder", str(out.resolve())),
        ("dataset", f"{config.data.format}: {config.data.root}"),
        ("backbone", f"{config.model.backbone} (weights: {config.model.weights})"),
        ("erasing steps", _mine_length(config, report.mine_log)),
        ("threshold", f"{config.mine.threshold_mode} {config.mine.threshold}"),
        ("saliency source", config.saliency.source),
        ("PSL", "on" if config.train.psl else "off (pseudo labels alone)"),
        ("segmentation training", _train_length(config, report.train_log)),
        (
            "precision / device",
            f"{config.precision} ({effective_precision(config)}) / {config.device}",
        ),
    ]
    versions = report.versions
    summary.append(
        (
            "versions",
            ", ".join(f"{k} {v}" for k, v in versions.items()) or "— (no OUT/config.yaml)",
        )
    )
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary
    )
    note = (
        f'<p class="missing">dataset not readable, image panels limited: '
        f"{html.escape(data_error)}</p>"
        if data_error
        else ""
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"<h1>AE-PSL run report</h1><p class='sub'>{html.escape(str(out))} · written {stamp}</p>"
        f'<h2 id="run">Run</h2><table class="summary">{rows}</table>{note}'
    )


def _health(report: RunReport) -> str:
    """The stages' collapse warnings (health.py), first thing under the run summary."""
    found = [
        line
        for metrics in (report.mine, report.labels, report.train_metrics)
        for line in (metrics or {}).get("warnings") or []
    ]
    if not found:
        return (
            '<p class="healthy">No stage collapsed: every class present in the image labels was '
            "mined, labelled and predicted.</p>"
        )
    items = "".join(f"<li>{html.escape(line)}</li>" for line in found)
    return f'<div class="warnings"><h2 id="health">Warnings</h2><ul>{items}</ul></div>'


def _mine_section(report: RunReport) -> str:
    head = '<h2 id="mine">Stage 1: adversarial erasing</h2>'
    curves = report.mine_curves
    chart = svg_chart(curves, "classifier training loss per erasing step")
    metrics = report.mine
    if metrics is None:
        return head + _not_run("mine/metrics.json") + (chart if curves else "")
    steps = metrics.get("steps", [])
    stopped = any("stopped" in step for step in steps)
    rows = []
    for step in steps:
        s, u = step.get("step_regions") or {}, step.get("union_regions") or {}
        row = [_num(step.get("step")), _num(step.get("train_loss"), 4), _num(step.get("val_mAP"))]
        row += [_num(r.get(k)) for r in (s, u) for k in ("precision", "recall")]
        row.append(_num(u.get("mined_fraction_of_objects"), 2))
        rows.append(row + ([html.escape(step.get("stopped", ""))] if stopped else []))
    head_row = ["step", "train loss", "val mAP", "step P", "step R", "union P", "union R"]
    head_row.append("union mined / objects")
    table = _table(head_row + (["stopped"] if stopped else []), rows)
    info = (
        f"<p>{html.escape(str(metrics.get('threshold_mode')))} threshold "
        f"{_num(metrics.get('threshold'), 2)}; steps used in the union: "
        f"{html.escape(str(metrics.get('steps_used')))}. "
        f"{html.escape(metrics.get('region_metrics', ''))}.</p>"
    )
    return head + table + info + _seed_table(metrics.get("seed_mIoU")) + chart


def _seed_table(seeds: dict[str, Any] | None) -> str:
    """Seed mIoU of each step's CAMs and of the union, at the best background threshold."""
    if not seeds:
        return ""
    rows = [
        [html.escape(name), _pct(r.get("best_mIoU")), _num(r.get("best_threshold"), 2)]
        for name, r in seeds.items()
    ]
    note = (
        "<p>Seed mIoU by the field's protocol (a constant background score swept from 0.05 to "
        "0.95; the best threshold is chosen on ground truth, an oracle).</p>"
    )
    return note + _table(["CAMs", "seed mIoU %", "best background threshold"], rows)


def _per_class(results: dict[str, dict[str, Any] | None]) -> str:
    names: list[str] = []
    for result in results.values():
        for name in (result or {}).get("per_class", {}):
            if name not in names:
                names.append(name)
    rows = [
        [html.escape(name)]
        + [
            _pct(((r or {}).get("per_class", {}).get(name) or {}).get("IoU"))
            for r in results.values()
        ]
        for name in names
    ]
    rows.append(
        ["<b>mIoU</b>"] + [f"<b>{_pct((r or {}).get('mIoU'))}</b>" for r in results.values()]
    )
    return _table(["class", *[f"IoU % {k}" for k in results]], rows)


def _labels_section(report: RunReport) -> str:
    head = '<h2 id="labels">Stage 2: pseudo labels</h2>'
    metrics = report.labels
    if metrics is None:
        return head + _not_run("labels/metrics.json")
    info = (
        f"<p>saliency {html.escape(str(metrics.get('saliency_source')))}, background below "
        f"{_num(metrics.get('bg_threshold'), 2)}, low saliency: "
        f"{html.escape(str(metrics.get('low_saliency')))}"
    )
    fill = metrics.get("salient_fill")
    if isinstance(fill, dict):
        floor = _num(fill.get("threshold"), 2)
        info += f", unmined salient pixels filled from CAMs of at least {floor}"
    info += ".</p>"
    if metrics.get("mIoU") is None:
        return head + info + '<p class="missing">no ground truth: pseudo labels not scored</p>'
    as_background = (metrics.get("unlabelled_as_background") or {}).get("mIoU")
    summary = _table(
        [
            "mIoU over labelled pixels",
            "mIoU, unlabelled as background",
            "labelled fraction",
            "pixel accuracy",
            "images",
        ],
        [
            [
                _pct(metrics.get("mIoU")),
                _pct(as_background),
                _pct(metrics.get("labelled_fraction")),
                _pct(metrics.get("pixel_accuracy")),
                _num(metrics.get("images")),
            ]
        ],
    )
    return head + info + summary + _per_class({"pseudo labels": metrics})


def _train_section(report: RunReport) -> str:
    head = '<h2 id="train">Stage 3: segmentation</h2>'
    metrics = report.train_metrics
    curves = report.train_curves
    chart = svg_chart(curves, "segmentation training loss terms")
    if metrics is None:
        return head + _not_run("train/metrics.json") + (chart if curves else "")
    note = f'<p class="missing">{html.escape(metrics["note"])}</p>' if metrics.get("note") else ""
    results = {
        "without CRF": metrics.get("without_crf"),
        "with CRF": metrics.get("with_crf"),
    }
    body = ""
    if any(results.values()):
        body = (
            f"<p>val split '{html.escape(str(metrics.get('split')))}': mIoU without CRF "
            f"{_pct((results['without CRF'] or {}).get('mIoU'))}, with CRF "
            f"{_pct((results['with CRF'] or {}).get('mIoU'))}.</p>"
            + _ceiling(report)
            + _per_class(results)
        )
    return head + note + body + chart


def _ceiling(report: RunReport) -> str:
    if report.ceiling_error:
        return f'<p class="missing">{html.escape(report.ceiling_error)}</p>'
    if report.ceiling is None or report.train_metrics is None:
        return ""
    return f"<p>{html.escape(ceiling_line(report.train_metrics, report.ceiling))}.</p>"


def _rows_table(head: list[str], rows: list[tuple[str, list[str]]]) -> str:
    header = "<th>image id</th>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        f'<tr><th class="rowhead">{html.escape(image_id)}</th>{"".join(cells)}</tr>'
        for image_id, cells in rows
    )
    return (
        f'<div class="scroll"><table class="pictures"><thead><tr>{header}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _train_images_section(report: RunReport) -> str:
    config, run, samples = report.config, report.run, report.train
    head = '<h2 id="train-images">Training images</h2>'
    if not samples:
        return head + _not_run("mine/step*/vis pictures")
    steps = report.steps
    columns = ["image"]
    for step in steps:
        columns += [f"step {step} erased", f"step {step} CAM"]
    columns += [
        "union regions",
        "saliency",
        "pseudo label",
        "prediction",
        "prediction + CRF",
        "ground truth",
    ]
    rows = []
    for sample in samples:
        cells = [_cell(_image(sample), "image")]
        for step in steps:
            vis = run.step(step).vis / f"{sample.id}.png"
            cells.append(_cell(lambda v=vis: _vis_third(v, 0), f"step {step} erased"))
            cells.append(_cell(lambda v=vis: _vis_third(v, 1), f"step {step} CAM"))
        cells.append(_cell(_index_file(run.union_region(sample.id)), "regions", True))
        saliency = run.saliency_map(sample.id)
        if not saliency.is_file() and config.saliency.source == "dir":
            saliency = (
                Path(config.saliency.dir) / f"{sample.id}.png"
                if config.saliency.dir
                else sample.saliency
            )
        grey = _file(saliency, lambda p: (read_gray_png(p) * 255 + 0.5).astype(np.uint8))
        cells.append(_cell(grey, "saliency"))
        cells.append(_cell(_index_file(run.pseudo_label(sample.id)), "pseudo label", True))
        for folder, alt in zip(report.predicted, ("prediction", "CRF prediction"), strict=True):
            path = folder / f"{sample.id}.png" if folder else None
            cells.append(_cell(_index_file(path), alt, True))
        cells.append(_cell(_index_file(sample.mask), "ground truth", True))
        rows.append((sample.id, cells))
    note = f'<p class="missing">{html.escape(report.data_error)}</p>' if report.data_error else ""
    return head + note + _rows_table(columns, rows)


def _val_images_section(report: RunReport) -> str:
    run, samples = report.run, report.val
    head = '<h2 id="val-images">Validation images</h2>'
    if not samples:
        return head + '<p class="missing">no val split</p>'
    rows = []
    for sample in samples:
        cells = [
            _cell(_image(sample), "image"),
            _cell(_index_file(run.predict / f"{sample.id}.png"), "prediction", True),
            _cell(_index_file(run.predict_crf / f"{sample.id}.png"), "CRF prediction", True),
            _cell(_index_file(sample.mask), "ground truth", True),
        ]
        rows.append((sample.id, cells))
    columns = ["image", "prediction", "prediction + CRF", "ground truth"]
    return head + _rows_table(columns, rows)


def _legend(classes: list[str]) -> str:
    if not classes:
        return ""
    names = [(0, "background"), *enumerate(classes, start=1), (255, "ignore / conflict")]
    colours = colourise(np.array([k for k, _ in names], np.uint8)).tolist()
    items = "".join(
        f'<span class="swatch" style="background: rgb{tuple(colour)}"></span>{html.escape(name)} '
        for colour, (_, name) in zip(colours, names, strict=True)
    )
    return f'<h2 id="legend">Colours</h2><p class="legend-row">{items}</p>'


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { margin-bottom: 0; } .sub { color: #666; margin-top: 4px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: center; }
table.summary th { text-align: left; background: #f4f4f4; }
table.summary td { text-align: left; }
table.metrics th { background: #f4f4f4; }
table.pictures td { padding: 2px; } table.pictures th { background: #f4f4f4; font-size: 12px; }
th.rowhead { font: 11px monospace; max-width: 80px; overflow-wrap: anywhere; }
img.panel { width: 90px; height: auto; display: block; }
img.label { image-rendering: pixelated; }
.nopanel { width: 90px; height: 68px; background: #ddd; color: #777; font-size: 28px;
  display: flex; align-items: center; justify-content: center; }
.missing { color: #a33; }
.scroll { overflow-x: auto; }
svg.chart { display: block; margin: 8px 0; font: 11px system-ui, sans-serif; }
svg.chart .plot { fill: #fafafa; stroke: #999; } svg.chart .grid { stroke: #e4e4e4; }
svg.chart .tick { fill: #555; } svg.chart .chart-title { font-weight: bold; fill: #222; }
svg.chart .legend { fill: #222; }
.warnings { border: 2px solid #d62728; background: #fff4f4; padding: 0 12px; }
.healthy { color: #2ca02c; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #888;
  margin: 0 4px 0 12px; vertical-align: middle; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
