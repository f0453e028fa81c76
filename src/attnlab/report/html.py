"""The inspection report as one self-contained HTML page: no network, no script, inline CSS/SVG/PNG.

The page is rendered generically from the report dict, so a new diagnostic shows up without code
here: every [n_layers][n_heads] grid becomes a heatmap, every per-layer list a bar chart, every
list of records a table (records with a token position also show that token in its context).
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
.fig p{margin:2px 0 6px;color:#5a6275;font-size:12px;max-width:330px}
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

_MAX_TABLE_ROWS = 40


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


def is_records(value: Any) -> bool:
    """True for a non-empty list of flat dicts (a table)."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def walk(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yields (path, value) for every value in nested dicts, depth first, in insertion order."""
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from walk(v, path + (str(k),))


def title_of(path: tuple[str, ...]) -> str:
    return " / ".join(p.replace("_", " ") for p in path) or "result"


def description_of(diagnostics: dict, path: tuple[str, ...]) -> str:
    """A metric's description, if its section carries one (``description``/``doc``/``about``)."""
    for depth in range(len(path), 0, -1):
        node: Any = diagnostics
        for p in path[: depth - 1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            for key in ("description", "doc", "about"):
                if isinstance(node.get(key), str):
                    return node[key]
    return ""


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


def attention_maps_section(chosen: list[dict], atlas: dict[tuple[int, int], np.ndarray], n_layers: int,
                           n_heads: int) -> str:
    """Thumbnails of chosen heads (large), then every head (small) in a collapsible atlas."""
    if not chosen and not atlas:
        return ""
    figs = []
    for c in chosen:
        m = np.asarray(c["map"], dtype=np.float64)
        m[m < 0] = np.nan  # -1 marks cells no query can see
        figs.append(
            f'<div class="fig"><h3>L{int(c["layer"])}.H{int(c["head"])}</h3><p>{esc(c.get("why", ""))}</p>'
            f'<img class="map" width="256" height="256" alt="attention map L{int(c["layer"])}.H{int(c["head"])}"'
            f' src="{figures.attention_png(m)}"></div>'
        )
    out = [
        "<h2>Attention maps</h2>",
        "<p class='sub'>Max-pooled maps: rows are queries (top = first token), columns keys; each pixel is the "
        "largest probability in its block, brightness ∝ √p; grey = masked (future).</p>",
        f'<div class="grid">{"".join(figs)}</div>',
    ]
    if atlas:
        cells = []
        for layer in range(n_layers):
            for h in range(n_heads):
                m = atlas.get((layer, h))
                if m is None:
                    cells.append("<div></div>")
                    continue
                small = pool_to(m, 32)
                cells.append(f'<div><img alt="L{layer}.H{h}" src="{figures.attention_png(small)}">L{layer}.H{h}</div>')
        out.append(
            f"<details><summary>All {len(atlas)} heads (layer per row)</summary>"
            f'<div class="atlas" style="grid-template-columns:repeat({n_heads},minmax(0,72px))">{"".join(cells)}</div></details>'
        )
    return "".join(out)


def pool_to(m: np.ndarray, size: int) -> np.ndarray:
    """Max-pools an (Sq, Sk) map to at most (size, size), keeping NaN only where a block is all NaN."""
    sq, sk = m.shape
    fq, fk = -(-sq // size), -(-sk // size)
    padded = np.full((fq * -(-sq // fq), fk * -(-sk // fk)), np.nan)
    padded[:sq, :sk] = m
    blocks = padded.reshape(padded.shape[0] // fq, fq, padded.shape[1] // fk, fk)
    with np.errstate(all="ignore"):
        all_nan = np.isnan(blocks).all(axis=(1, 3))
        out = np.nanmax(np.where(np.isnan(blocks), -np.inf, blocks), axis=(1, 3))
    out[all_nan] = np.nan
    return out


def render(report: dict, atlas: dict[tuple[int, int], np.ndarray] | None = None) -> str:
    """The whole page for ``report`` (see ``attnlab.report.inspect.build_report``) as one HTML string."""
    meta = report.get("meta", {})
    diag = report.get("diagnostics", {})
    tokens = report.get("tokens", [])
    n_layers, n_heads = int(meta.get("n_layers", 0)), int(meta.get("n_heads", 0))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>attnlab inspect: {esc(meta.get('model', ''))}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>attnlab inspect: {esc(meta.get('model', ''))}</h1>",
        f"<p class='sub'>{esc(meta.get('text_source', ''))} · {fmt(meta.get('n_tokens', 0))} tokens · "
        f"attnlab {esc(report.get('attnlab_version', ''))}</p>",
        "<h2>Summary</h2>",
        summary_cards(report.get("summary", [])),
    ]
    shown: set[tuple[str, ...]] = set()

    # Tables first: sinks, hidden sinks, massive activations (token text in context).
    tables = [(p, v) for p, v in walk(diag) if is_records(v)]
    for path, value in tables:
        desc = description_of(diag, path)
        parts.append(f"<h2>{esc(title_of(path))}</h2>" + (f"<p class='sub'>{esc(desc)}</p>" if desc else ""))
        parts.append(records_table(value, tokens))
        shown.add(path)

    series = [(p, v) for p, v in walk(diag) if is_series(v, n_layers) and not is_grid(v, n_layers, n_heads)]
    if series:
        parts.append("<h2>Per layer</h2><div class='grid'>")
        for path, value in series:
            finite = [x for x in value if x is not None]
            top = set(np.argsort([-(x if x is not None else -np.inf) for x in value])[: min(4, len(finite))].tolist())
            desc = description_of(diag, path)
            parts.append(
                f"<div class='fig'><h3>{esc(title_of(path))}</h3><p>{esc(desc)}"
                f"{' ' if desc else ''}Orange: the {len(top)} largest.</p>"
                + figures.bar_chart_svg(value, [f"L{i}" for i in range(len(value))], title_of(path), top, width=520)
                + "</div>"
            )
            shown.add(path)
        parts.append("</div>")

    grids = [(p, v) for p, v in walk(diag) if is_grid(v, n_layers, n_heads)]
    if grids:
        parts.append("<h2>Per head (rows: layers, columns: heads; hover a cell for its value)</h2><div class='grid'>")
        for path, value in grids:
            desc = description_of(diag, path)
            parts.append(f"<div class='fig'><h3>{esc(title_of(path))}</h3>"
                         + (f"<p>{esc(desc)}</p>" if desc else "")
                         + figures.heatmap_svg(value, title_of(path)) + "</div>")
            shown.add(path)
        parts.append("</div>")

    maps = report.get("attention_maps", {})
    parts.append(attention_maps_section(maps.get("chosen", []), atlas or {}, n_layers, n_heads))

    scalars = [(p, v) for p, v in walk(diag) if p and isinstance(v, (numbers.Number, str)) and p[-1] not in
               ("description", "doc", "about")]
    if scalars:
        rows = "".join(f"<tr><td>{esc(title_of(p))}</td><td class='num'>{fmt(v)}</td></tr>" for p, v in scalars)
        parts.append(f"<h2>All single numbers</h2><table><tbody>{rows}</tbody></table>")

    if tokens:
        parts.append(f"<details><summary>The analysed text ({len(tokens)} tokens)</summary>"
                     f"<div class='text ctx'>{esc(''.join(tokens))}</div></details>")
    timings = meta.get("seconds", {})
    if timings:
        parts.append("<p class='sub'>Time: " + esc(", ".join(f"{k} {v:.1f} s" for k, v in timings.items())) + "</p>")
    parts.append("<p class='sub'>Every number on this page is in report.json beside it.</p></main></body></html>")
    return "".join(parts)
