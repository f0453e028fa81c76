"""The inspection report as one self-contained HTML page: no network, no script, inline CSS/SVG/PNG.

The page is rendered generically from the report dict, so a new diagnostic shows up without code
here: every per-head [n_layers][n_heads] grid becomes a heatmap, every per-layer list a bar chart,
every list of records a table (records with a token position also show that token in context).
All text that comes from the model, the tokenizer or the user goes through ``html.escape``.
"""
from __future__ import annotations

import html
import json
import numbers
from typing import Any, Iterator

import numpy as np

from . import figures

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;background:#f4f5f8}
main{max-width:1320px;margin:0 auto;padding:18px 26px 60px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #d8dce6;padding-bottom:3px}
h3{font-size:14px;margin:0 0 4px}
.sub{color:#5a6275;margin:0 0 12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde1ea;border-radius:8px;padding:10px 12px}
.card .k{color:#5a6275;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:15px;margin-top:2px;word-break:break-word}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.fig{background:#fff;border:1px solid #dde1ea;border-radius:8px;padding:8px 10px}
.fig p{margin:2px 0 6px;color:#5a6275;font-size:12px;max-width:210px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0 10px}
th,td{border:1px solid #dde1ea;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef0f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:"DejaVu Sans Mono",Menlo,monospace;font-size:12px;white-space:pre-wrap;color:#5a6275}
.tok{font-family:"DejaVu Sans Mono",Menlo,monospace;background:#eef0f5;border-radius:3px;padding:0 3px;white-space:pre}
mark{background:#ffd27a;color:#1d2330;border-radius:2px;padding:0 1px}
svg .ax{font-size:10px;fill:#5a6275}
img.map{image-rendering:pixelated;border:1px solid #c9cedb;display:block}
.atlas{display:grid;gap:3px;align-items:start}
.atlas div{font-size:9px;color:#5a6275;text-align:center}
.atlas img{width:100%;image-rendering:pixelated}
details{margin:8px 0}summary{cursor:pointer;color:#3a6ea5}
.text{background:#fff;border:1px solid #dde1ea;border-radius:8px;padding:10px;max-height:340px;overflow:auto}
pre{white-space:pre-wrap}
"""

_MAX_TABLE_ROWS = 15


def esc(value: Any) -> str:
    """HTML-escapes any value's ``str`` (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def show_token(text: str) -> str:
    """Escaped token text with invisible characters made visible (space as itself, newline as ⏎)."""
    return esc(text.replace("\n", "⏎").replace("\t", "⇥"))


def token_in_context(tokens: list[str], position: int, width: int = 8) -> str:
    """The token at ``position`` highlighted, with ``width`` tokens of context on each side (escaped)."""
    if not 0 <= position < len(tokens):
        return ""
    left = "".join(tokens[max(0, position - width):position])
    right = "".join(tokens[position + 1:position + 1 + width])
    return (f'<span class="ctx">{show_token(left)}<mark>{show_token(tokens[position])}</mark>'
            f"{show_token(right)}</span>")


def fmt(x: Any) -> str:
    """A number for a table: 4 significant digits; other values escaped as text."""
    if isinstance(x, bool) or not isinstance(x, numbers.Number):
        return esc(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    return "n/a" if not np.isfinite(x) else f"{float(x):.4g}"


# ---------------------------------------------------------------- finding things in the dict

def is_grid(value: Any, n_layers: int, n_heads: int) -> bool:
    """True for a [n_layers][n_heads] nested list of numbers (None allowed)."""
    return (
        isinstance(value, list) and len(value) == n_layers and n_layers > 0
        and all(isinstance(r, list) and len(r) == n_heads for r in value)
        and all(x is None or (isinstance(x, numbers.Number) and not isinstance(x, bool)) for r in value for x in r)
    )


def is_series(value: Any, n_layers: int) -> bool:
    """True for a per-layer list of numbers."""
    return (
        isinstance(value, list) and len(value) == n_layers and n_layers > 0
        and all(x is None or (isinstance(x, numbers.Number) and not isinstance(x, bool)) for x in value)
    )


def walk(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yields (path, value) for every value in nested dicts, depth first, in insertion order."""
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from walk(v, path + (str(k),))


# ---------------------------------------------------------------- page sections

def summary_cards(items: list[list[str]]) -> str:
    """items: [label, plain text] pairs; both are escaped here."""
    cards = "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>'
                    for k, v in items)
    return f'<div class="cards">{cards}</div>'


def records_table(records: list[dict], tokens: list[str], max_rows: int = _MAX_TABLE_ROWS) -> str:
    """A table of records; a record's token position (``position``/``pos``/``token_index``) adds a context column."""
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    pos_key = next((k for k in ("position", "pos", "token_index", "index") if k in columns), None)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns) + ("<th>in context</th>" if pos_key and tokens else "")
    rows = []
    for r in records[:max_rows]:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if isinstance(v, str) and c in ("token", "text", "token_text"):
                cells.append(f'<td><span class="tok">{show_token(v)}</span></td>')
            elif isinstance(v, (list, dict)):
                cells.append(f"<td>{esc(json.dumps(v)[:200])}</td>")
            else:
                cls = ' class="num"' if isinstance(v, numbers.Number) else ""
                cells.append(f"<td{cls}>{fmt(v)}</td>")
        if pos_key and tokens:
            p = r.get(pos_key)
            cells.append(f"<td>{token_in_context(tokens, p) if isinstance(p, int) else ''}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='sub'>{len(records) - max_rows} more rows in report.json</p>" if len(records) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def attention_maps_section(maps: dict) -> str:
    """Thumbnails of the chosen heads: ``maps = {"chosen": [{"layer", "head", "why", "map"}], "pooling"}``."""
    chosen = maps.get("chosen") or []
    if not chosen:
        return ""
    figs = []
    for c in chosen:
        m = np.array([[np.nan if x is None else x for x in row] for row in c["map"]], dtype=np.float64)
        name = f"L{int(c['layer'])}.H{int(c['head'])}"
        figs.append(
            f'<div class="fig"><h3>{name}</h3><p>{esc(c.get("why", ""))}</p>'
            f'<img class="map" width="224" height="224" alt="attention map {name}" src="{figures.attention_png(m)}"></div>'
        )
    return (
        "<h2>Attention maps</h2>"
        f"<p class='sub'>{esc(maps.get('pooling', ''))} Rows are queries (top: first token), columns keys; "
        "brightness grows with log probability (black: below 1e-4, yellow: 1); grey: masked.</p>"
        f'<div class="grid">{"".join(figs)}</div>'
    )


def render(report: dict) -> str:
    """The whole page for ``report`` (the dict of ``attnlab.report.inspect.inspect_text``) as one HTML string.

    Reads ``meta``, ``summary`` ([label, text] pairs), ``notes`` ({metric: description}),
    ``diagnostics["per_head"]`` ({metric: [L][H]}), ``diagnostics["per_layer"]`` ({metric: [L]}),
    ``tables`` ({title: [records]}), ``locality`` ({"labels", "grid": [L][buckets]}),
    ``attention_maps`` and ``diagnostics["input"]["tokens"]``. Anything else is left to report.json.
    """
    meta = report.get("meta", {})
    diag = report.get("diagnostics", {})
    notes = report.get("notes", {})
    tokens = (diag.get("input") or {}).get("tokens") or []
    n_layers, n_heads = int(meta.get("n_layers", 0)), int(meta.get("n_heads", 0))

    def note(name: str) -> str:
        return f"<p>{esc(notes[name])}</p>" if name in notes else ""

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>attnlab inspect: {esc(meta.get('model', ''))}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>attnlab inspect: {esc(meta.get('model', ''))}</h1>",
        f"<p class='sub'>{esc(meta.get('text_source', ''))} · {fmt(meta.get('n_tokens', 0))} tokens · "
        f"attnlab {esc(report.get('attnlab_version', ''))}</p>",
        summary_cards(report.get("summary", [])),
    ]
    grids = [(k, v) for k, v in (diag.get("per_head") or {}).items() if is_grid(v, n_layers, n_heads)]
    if grids:
        parts.append("<h2>Per head</h2><p class='sub'>Rows: layers (0 at top); columns: heads. "
                     "Hover a cell for its value.</p><div class='grid'>")
        for name, grid in grids:
            parts.append(f"<div class='fig'><h3>{esc(name)}</h3>{note(name)}"
                         + figures.heatmap_svg(grid, name, cell=max(10, min(18, 180 // max(n_heads, 1))))
                         + "</div>")
        parts.append("</div>")

    parts.append(attention_maps_section(report.get("attention_maps") or {}))

    series = [(k, v) for k, v in (diag.get("per_layer") or {}).items() if is_series(v, n_layers)]
    locality = report.get("locality") or {}
    if series or locality:
        parts.append("<h2>Per layer</h2><div class='grid'>")
        for name, values in series:
            finite = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
            top = set(np.argsort(-np.nan_to_num(finite, nan=-np.inf))[: min(4, int(np.isfinite(finite).sum()))].tolist())
            parts.append(
                f"<div class='fig'><h3>{esc(name)}</h3>{note(name)}<p>Orange: the {len(top)} largest.</p>"
                + figures.bar_chart_svg(values, [f"L{i}" for i in range(len(values))], name, top, width=400, bar_h=12)
                + "</div>"
            )
        if locality.get("grid"):
            parts.append(f"<div class='fig'><h3>locality profile</h3>{note('locality')}"
                         + figures.heatmap_svg(locality["grid"], "locality", cell=16, col_labels=locality.get("labels"))
                         + "</div>")
        parts.append("</div>")

    for title, records in (report.get("tables") or {}).items():
        if records:
            parts.append(f"<h2>{esc(title)}</h2>" + (f"<p class='sub'>{esc(notes[title])}</p>" if title in notes else ""))
            parts.append(records_table(records, tokens))

    scalars = [(p, v) for p, v in walk(diag) if p and isinstance(v, numbers.Number) and not isinstance(v, bool)]
    if scalars:
        rows = "".join(f"<tr><td>{esc(' / '.join(p))}</td><td class='num'>{fmt(v)}</td></tr>" for p, v in scalars)
        parts.append(f"<details><summary>All single numbers</summary><table><tbody>{rows}</tbody></table></details>")
    if tokens:
        parts.append(f"<details><summary>The analysed text ({len(tokens)} tokens)</summary>"
                     f"<div class='text ctx'>{esc(''.join(tokens))}</div></details>")
    parts.append("<p class='sub'>Every number on this page, and more, is in report.json beside it.</p>"
                 "</main></body></html>")
    return "".join(parts)
