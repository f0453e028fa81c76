"""attnlab bench quality on a toy grid: every row trained, files written, budgets matched."""
import json

import pytest
import torch

from attnlab.bench.quality import QualityConfig, matched_width, sweep, write
from attnlab.cli import main as cli_main
from attnlab.mechanisms import MECHANISMS
from attnlab.tasks import MQAR


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is faster, and far faster when other jobs share the 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _other() -> str:
    return next((m for m in MECHANISMS if m != "softmax"), "softmax")


def test_toy_sweep_writes_table_json_png(tmp_path):
    config = QualityConfig(mechanisms=["softmax", _other()], lengths=[16], widths=[16], vocab_size=32, steps=6,
                           batch_size=8, extra=["icl", "algorithmic", "listops", "scan_snap"], extra_steps=3,
                           progress=False)
    rows = sweep(config)
    assert len(rows) == 2 + 2 * 4
    mqar = [r for r in rows if r.get("seq_len") == 16]
    assert all("error" not in r and 0.0 <= r["metric"] <= 1.0 for r in mqar if r["mechanism"] == "softmax")
    icl = next(r for r in rows if r.get("kind") == "icl" and r["mechanism"] == "softmax")
    assert 0.09 < icl["ridge_mse"] < 0.2 and icl["metric"] > 0
    alg = next(r for r in rows if r.get("kind") == "algorithmic" and r["mechanism"] == "softmax")
    assert "mse_n16" in alg
    paths = write(rows, config, str(tmp_path), "attnlab bench quality (test)", 1.0)
    saved = json.load(open(paths["json"]))
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["command"].startswith("attnlab bench quality")
    md = open(paths["md"]).read()
    assert "## MQAR, width 16" in md and "| softmax |" in md and "ICL regression" in md
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sweep(config, done_rows=rows) == rows  # --resume: nothing left to train


def test_matched_width_is_closest_budget():
    config = QualityConfig(n_heads=2)
    task = MQAR(32, 2, 64)
    assert matched_width(task, "softmax", 32, config) == 32
    for m in MECHANISMS:
        d = matched_width(task, m, 32, config)
        assert d % 4 == 0 and 16 <= d <= 64


def test_cli_rejects_unknown_mechanism(tmp_path):
    with pytest.raises(ValueError, match="mechanisms"):
        cli_main(["bench", "quality", "--mechanisms", "nope", "--out", str(tmp_path)])
