"""The report's figure helpers: PNG encoding, colour scale, escaping inside SVG."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from attnlab.report import figures
from attnlab.report.html import records_table, token_in_context


def test_png_round_trips_through_pillow():
    image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    uri = figures.png_data_uri(rgb)
    assert uri.startswith("data:image/png;base64,")
    decoded = np.asarray(image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    np.testing.assert_array_equal(decoded, rgb)


def test_colormap_ends_and_nan():
    c = figures.colormap(np.array([0.0, 1.0, np.nan, -3.0, 7.0]))
    assert c[0].tolist() == [0x44, 0x01, 0x54] and c[1].tolist() == [0xFD, 0xE7, 0x25]
    assert c[2].tolist() == [225, 225, 225]
    assert c[3].tolist() == c[0].tolist() and c[4].tolist() == c[1].tolist()  # clipped


def test_heatmap_has_one_cell_per_head_and_escapes_labels():
    svg = figures.heatmap_svg([[0.1, 0.2, None], [0.3, 0.4, 0.5]], "a<b", col_labels=["<x>", "y", "z"])
    assert svg.count("<rect") == 6 + 24  # cells + colour bar
    assert "<x>" not in svg and "&lt;x&gt;" in svg and 'aria-label="a&lt;b"' in svg
    assert "L0 &lt;x&gt; = 0.1" in svg and "= n/a" in svg


def test_token_text_is_escaped_in_tables():
    tokens = ["<b>", " & ", "\n", "</td>"]
    assert "<b>" not in token_in_context(tokens, 0) and "&lt;b&gt;" in token_in_context(tokens, 0)
    table = records_table([{"position": 3, "text": "</td>", "n": 1.5}], tokens)
    assert "&lt;/td&gt;" in table and table.count("<tr>") == 2
    assert table.count("<td") == 4 and table.count("</td>") == 4  # the token's "</td>" closed no cell
