"""Figures for the inspection report, with no plotting dependency.

Heatmaps and bar charts are inline SVG (crisp at any zoom, a tooltip per cell); attention-map
thumbnails are PNG files written here with zlib and embedded as ``data:`` URIs. Every text that
reaches the SVG goes through ``html.escape``.
"""
from __future__ import annotations

import base64
import html
import struct
import zlib

import numpy as np

# Anchor colours of the perceptually uniform "viridis" scale; we interpolate between them.
_VIRIDIS = np.array(
    [
        [0x44, 0x01, 0x54], [0x46, 0x32, 0x7E], [0x36, 0x5C, 0x8D], [0x27, 0x7F, 0x8E],
        [0x1F, 0xA1, 0x87], [0x4A, 0xC1, 0x6D], [0xA0, 0xDA, 0x39], [0xFD, 0xE7, 0x25],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] (any shape S) to RGB uint8, shape (*S, 3); NaN becomes light grey."""
    v = np.asarray(values, dtype=np.float64)
    nan = ~np.isfinite(v)
    x = np.clip(np.nan_to_num(v), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    t = (x - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t
    rgb[nan] = 225
    return np.round(rgb).astype(np.uint8)


def _hex(rgb: np.ndarray) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in rgb)


def normalise(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Rescales finite values to [0, 1] between lo and hi (default: their min and max)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if lo is None and finite.size else (lo or 0.0)
    hi = float(finite.max()) if hi is None and finite.size else (hi if hi is not None else 1.0)
    span = hi - lo if hi > lo else 1.0
    return (v - lo) / span


def png_data_uri(rgb: np.ndarray) -> str:
    """Encodes an (H, W, 3) uint8 image as a ``data:image/png;base64,...`` URI."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def attention_png(pooled: np.ndarray, floor: float = 1e-4) -> str:
    """A pooled attention map (S_q, S_k) of probabilities as a PNG data URI, on a log scale.

    Colour is log10(p) from log10(floor) (dark) to 0 (yellow), so a sink column and a faint
    diagonal are visible at once. NaN cells are drawn light grey.
    """
    p = np.asarray(pooled, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.log10(np.clip(p, floor, 1.0)) / -np.log10(floor) + 1.0
    return png_data_uri(colormap(np.where(np.isfinite(p), level, np.nan)))


def heatmap_svg(grid: list[list[float]], title: str, cell: int = 14, col_labels: list[str] | None = None) -> str:
    """A layer x head heatmap as inline SVG: rows are layers (0 at top), columns heads (or ``col_labels``).

    Each cell has a tooltip ``L{layer}.H{head} = value``; a colour bar states the range.
    """
    a = np.array([[np.nan if x is None else float(x) for x in row] for row in grid], dtype=np.float64)
    n_layers, n_heads = a.shape
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    colours = colormap(normalise(a, lo, hi))
    left = 30
    # Long column labels are rotated, so the header grows instead of the labels overlapping.
    top = 16 if col_labels is None else 16 + 6 * max(len(str(c)) for c in col_labels)
    width, height = left + n_heads * cell + 8, top + n_layers * cell + 34
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img"'
        f' aria-label="{html.escape(title)}" class="heatmap">'
    ]
    if col_labels is None:
        for h in range(n_heads):
            out.append(f'<text x="{left + h * cell + cell / 2}" y="{top - 4}" class="ax" text-anchor="middle">{h}</text>')
    else:
        for h, c in enumerate(col_labels):
            x = left + h * cell + cell / 2 + 3
            out.append(f'<text x="{x}" y="{top - 4}" class="ax" transform="rotate(-90 {x} {top - 4})">{html.escape(str(c))}</text>')
    for layer in range(n_layers):
        y = top + layer * cell
        if layer % 5 == 0 or layer == n_layers - 1:
            out.append(f'<text x="{left - 4}" y="{y + cell - 3}" class="ax" text-anchor="end">{layer}</text>')
        for h in range(n_heads):
            v = a[layer, h]
            label = "n/a" if not np.isfinite(v) else f"{v:.4g}"
            name = f"L{layer}.H{h}" if col_labels is None else f"L{layer} {html.escape(str(col_labels[h]))}"
            out.append(
                f'<rect x="{left + h * cell}" y="{y}" width="{cell}" height="{cell}" fill="{_hex(colours[layer, h])}">'
                f"<title>{name} = {label}</title></rect>"
            )
    # Colour bar under the grid.
    bar_y, bar_w = top + n_layers * cell + 8, n_heads * cell
    steps = 24
    for i in range(steps):
        c = _hex(colormap(np.array(i / (steps - 1))))
        out.append(f'<rect x="{left + i * bar_w / steps:.1f}" y="{bar_y}" width="{bar_w / steps + 0.5:.1f}" height="8" fill="{c}"/>')
    out.append(f'<text x="{left}" y="{bar_y + 20}" class="ax">{lo:.3g}</text>')
    out.append(f'<text x="{left + bar_w}" y="{bar_y + 20}" class="ax" text-anchor="end">{hi:.3g}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart_svg(values: list[float], labels: list[str], title: str, highlight: set[int] | None = None,
                  width: int = 640, bar_h: int = 14) -> str:
    """Horizontal bars, one per entry (e.g. per layer); ``highlight`` indexes are drawn in orange."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    span = hi - lo if hi > lo else 1.0
    left, right = 60, 70
    plot_w = width - left - right
    height = len(v) * bar_h + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img"'
           f' aria-label="{html.escape(title)}" class="bars">']
    zero_x = left + (0 - lo) / span * plot_w
    for i, (x, label) in enumerate(zip(v, labels)):
        y = 5 + i * bar_h
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 3}" class="ax" text-anchor="end">{html.escape(label)}</text>')
        if not np.isfinite(x):
            continue
        x0, x1 = sorted((zero_x, left + (x - lo) / span * plot_w))
        colour = "#e8710a" if highlight and i in highlight else "#3a6ea5"
        out.append(f'<rect x="{x0:.1f}" y="{y + 1}" width="{max(x1 - x0, 0.5):.1f}" height="{bar_h - 3}" fill="{colour}">'
                   f"<title>{html.escape(label)} = {x:.4g}</title></rect>")
        out.append(f'<text x="{x1 + 4:.1f}" y="{y + bar_h - 3}" class="ax">{x:.4g}</text>')
    out.append("</svg>")
    return "".join(out)
