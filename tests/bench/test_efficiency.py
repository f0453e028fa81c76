"""CAB efficiency length: the crossing of a quadratic and a linear fit, and the bench on a toy grid."""
import json

import pytest
import torch

from attnlab.bench.efficiency import EfficiencyConfig, efficiency_length, markdown, run


def test_efficiency_length_solves_the_crossing():
    n = [256, 512, 1024, 2048, 4096]
    base = [1e-6 * x * x for x in n]  # softmax: N^2 / 1e6
    mech = [2e-3 * x for x in n]  # mechanism: 2e-3 N, so they meet at N = 2000
    assert efficiency_length(n, base, mech, drop_first=False) == pytest.approx(2000.0, rel=1e-6)
    # 10x softmax's cost: its linear fit is only overtaken far beyond the measured range (reported, marked)
    assert efficiency_length(n, base, [10.0 * b for b in base], drop_first=False) > 4 * max(n)
    above = [b + 10.0 for b in base]
    assert efficiency_length(n, above, [1.0] * 5, drop_first=False) is None  # cheaper everywhere: no crossing
    assert efficiency_length(n[:2], base[:2], mech[:2], drop_first=False) is None  # too few points


def test_toy_bench_rows_and_summary():
    torch.set_num_threads(1)
    config = EfficiencyConfig(mechanisms=["softmax"], lengths=[16, 32, 64], d_model=16, n_heads=2, repeats=1,
                              progress=False)
    rows, summary = run(config)
    assert [r["n"] for r in rows] == [16, 32, 64] and summary == []
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] >= 0 and "error" not in r for r in rows)
    text = markdown(rows, summary, config, "attnlab bench efficiency (test)")
    assert "| softmax | 64 |" in text and json.dumps(rows)


def test_unknown_mechanism():
    with pytest.raises(ValueError, match="mechanisms"):
        run(EfficiencyConfig(mechanisms=["nope"], lengths=[8], progress=False))
