"""`attnlab bench kernels` end to end at a toy size (no FlexAttention compile: --quick)."""
from __future__ import annotations

import json

import torch

from attnlab.bench import kernels as bench
from attnlab.cli import main


def test_grid_shapes():
    assert bench._grid(8192, 2) == (64, 128) and bench._grid(16384, 2) == (128, 128)
    assert bench._grid(8192, 3) == (16, 16, 32) and bench._grid(1000, 2) is None


def test_cli_quick_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "k.json"
    assert main(["bench", "kernels", "--quick", "--lengths", "512", "--repeats", "1", "--no-progress",
                 "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| N | case | impl |" in printed and "window 257" in printed
    data = json.loads(path.read_text())
    rows = {(r["case"], r["impl"]): r for r in data["rows"]}
    assert rows[("dense", "sdpa")]["speedup"] == 1.0
    window = rows[("window 257", "attnlab")]
    assert window["kernel"] == "sdpa"  # 512 x 512 is a small call on CPU: dense mask, no compile
    assert 0 < window["element_density"] < 1 and window["time_s"] > 0
    assert window["frac_ideal"] == window["speedup"] * window["element_density"]
    assert rows[("window 257", "flex peer")]["note"].startswith("skipped")


def test_rows_match_attention_choice():
    q = torch.zeros(1, 16, 8192, 128)
    cases = dict(bench.cases(8192, "cpu"))
    from attnlab.kernels import choose_kernel

    assert choose_kernel(q, q, cases["window 257"]) == "banded"
    assert choose_kernel(q, q, cases["nbhd2d 64x128 k=17x33"]) == "flex"
