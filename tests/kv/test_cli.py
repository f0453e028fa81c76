"""`attnlab kv`: argument errors before any model load; the sweep's table and figure."""
from __future__ import annotations

import pytest

from attnlab.cli import main
from attnlab.kv.evaluate import PolicyResult, policies_for
from attnlab.kv.figures import sweep_figure, sweep_table


@pytest.mark.parametrize("argv, message", [
    (["kv", "eval", "--policy", "lru", "--budget", "0.3", "--task", "needle", "--length", "512"], "unknown KV policy"),
    (["kv", "eval", "--policy", "snapkv", "--budget", "1.5", "--task", "needle", "--length", "512"], "budget"),
    (["kv", "eval", "--policy", "snapkv", "--budget", "0", "--task", "needle", "--length", "512"], "budget"),
    (["kv", "eval", "--policy", "full", "--budget", "0.5", "--task", "needle", "--length", "512"], "budget"),
    (["kv", "eval", "--policy", "razor", "--budget", "0.3", "--task", "sudoku", "--length", "512"], "unknown task"),
    (["kv", "sweep", "--policies", "full", "lru", "--task", "needle", "--length", "512"], "unknown KV policy"),
    (["kv", "sweep", "--task", "needle", "--length", "512", "--samples", "0"], "samples"),
])
def test_errors_name_the_argument(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_policies_for_runs_full_once():
    names = [(p.name, p.budget) for p in policies_for(["full", "streaming", "razor"], [0.1, 0.3])]
    assert names == [("full", 1.0), ("streaming", 0.1), ("streaming", 0.3), ("razor", 0.1), ("razor", 0.3)]


def test_sweep_table_and_figure(tmp_path):
    rows = [PolicyResult("full", 1.0, "needle", 4096, 10, accuracy=0.8, ci95=(0.5, 0.9), kept_fraction=1.0),
            PolicyResult("razor", 0.3, "needle", 4096, 10, accuracy=0.6, ci95=(0.3, 0.8), kept_fraction=0.31),
            PolicyResult("streaming", 0.3, "needle", 4096, 10, accuracy=0.1, ci95=(0.0, 0.4), kept_fraction=0.3)]
    table = sweep_table(rows, command="attnlab kv sweep ...")
    assert "| needle | razor | 0.3 | 0.310 | 69% | 0.600 | [0.30, 0.80] | 0.75 |" in table
    png = sweep_figure(rows, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_figure_with_perfect_accuracy(tmp_path):
    """A Wilson upper bound that rounds a hair below an accuracy of 1.0 must not break the figure."""
    from attnlab.tasks import wilson_interval

    lo, hi = wilson_interval(6, 6)
    rows = [PolicyResult("full", 1.0, "needle", 4096, 6, accuracy=1.0, ci95=(lo, hi - 1e-12), kept_fraction=1.0)]
    assert sweep_figure(rows, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
