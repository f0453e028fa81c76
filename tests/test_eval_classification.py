"""The few-shot classification harness and `attnlab eval --task sst2 ...` on the real SmolLM2-135M-Instruct."""
import json

import numpy as np
import pytest

from attnlab.cli import main
from attnlab.eval import classification_prompts, evaluate_classification, get_intervention
from attnlab.interventions import INTERVENTIONS, Intervention, head_scale
from attnlab.tasks.classification import CLASSIFICATION_TASKS

ALL_HEADS_2_TO_11 = [[layer, h] for layer in range(2, 12) for h in range(9)]


def test_prompt_sets_keep_rows_across_seeds_and_demos_out_of_the_rows(smollm):
    _, tok = smollm
    a = classification_prompts("sst2", tok, "test", 2, 0, 12)
    b = classification_prompts("sst2", tok, "test", 2, 1, 12)
    assert a.rows == b.rows and len(a.rows) == 12 and a.split_size == 1821
    assert a.prompts != b.prompts  # other demonstrations
    test = CLASSIFICATION_TASKS["sst2"].read("test")
    assert a.labels.tolist() == [test[i].label for i in a.rows]
    for ids, i in zip(a.prompts, a.rows):
        assert tok.decode(ids).endswith(f"Review: {test[i].fields[0]}\nSentiment:")
    assert len(a.content_free) == 3 and tok.decode(a.content_free[0]).endswith("Review: N/A\nSentiment:")
    full = classification_prompts("cb", tok, "test", 0, 0, None)
    assert len(full.rows) == 56


def test_zero_shot_sst2_is_well_above_chance(smollm):
    """Measured beforehand on these 40 rows: 0-shot 0.60 uncalibrated (interval reaches chance), 0.775 calibrated."""
    model, tok = smollm
    r = evaluate_classification("sst2", model, tok, shots=0, n_samples=40, seed=0, progress=False)
    b = r.baseline
    assert r.n_samples == 40 and r.split == "test" and len(b.correct) == 40
    assert b.uncalibrated == np.mean(b.correct) and b.calibrated == np.mean(b.correct_calibrated)
    assert b.uncalibrated_ci[0] <= b.uncalibrated <= b.uncalibrated_ci[1]
    assert b.calibrated_ci[0] > 0.55  # the whole 95% interval of the calibrated accuracy above chance (0.5)
    assert abs(sum(b.p_cf) - 1) < 1e-9 and r.modified is None and r.delta is None
    assert "sst2 shots=0 seed=0 test split: 40 of 1821 rows" in r.summary()


def test_identity_intervention_changes_nothing(smollm):
    model, tok = smollm
    r = evaluate_classification("sst2", model, tok, shots=2, n_samples=6, progress=False, intervention="head_scale",
                                hyper=dict(heads=ALL_HEADS_2_TO_11, scale=1.0))
    assert r.modified.log_likelihoods == r.baseline.log_likelihoods  # x1.0 keeps outputs bit-identical
    assert r.delta["uncalibrated"] == 0 and r.delta["uncalibrated_ci"] == (0.0, 0.0)
    assert r.dev is None  # a one-candidate grid needs no search


def test_grid_is_searched_on_dev_with_dev_calibration_prompts(smollm):
    model, tok = smollm
    seen = []

    def scale_heads(model, tokenizer, calibration, **hyper):
        seen.append(calibration)
        return head_scale(model, tokenizer, calibration, **hyper)

    iv = Intervention(scale_heads, ({"scale": 1.0}, {"scale": 0.0}), "", "scale heads 2-11")
    r = evaluate_classification("sst2", model, tok, shots=1, n_samples=8, seed=3, intervention=iv,
                                hyper=dict(heads=ALL_HEADS_2_TO_11), dev_samples=8, n_calibration=5,
                                progress=False)
    table = r.dev["table"]
    assert r.dev["split"] == "dev" and r.dev["n_samples"] == 8 and r.dev["split_size"] == 872
    assert [row["hyper"] for row in table[1:]] == [dict(scale=1.0, heads=ALL_HEADS_2_TO_11),
                                                    dict(scale=0.0, heads=ALL_HEADS_2_TO_11)]
    assert table[1]["uncalibrated"] == table[0]["uncalibrated"]  # scale 1.0 is the baseline
    best = max(table[1:], key=lambda row: row["uncalibrated"])  # ties: the first
    assert r.hyper == best["hyper"]
    # calibration prompts: the first dev prompts, never a test row
    dev_text = {e.fields[0] for e in CLASSIFICATION_TASKS["sst2"].read("dev")}
    test_text = {e.fields[0] for e in CLASSIFICATION_TASKS["sst2"].read("test")}
    assert len(seen) == 3 and all(len(c) == 5 for c in seen)
    for ids in seen[0]:
        query = tok.decode(ids).rsplit("Review: ", 1)[1].removesuffix("\nSentiment:")
        assert query in dev_text and query not in test_text
    d = r.delta
    assert d["uncalibrated"] == pytest.approx(r.modified.uncalibrated - r.baseline.uncalibrated)
    assert d["calibrated_ci"][0] <= d["calibrated"] <= d["calibrated_ci"][1]


def test_bad_arguments(smollm):
    model, tok = smollm
    with pytest.raises(ValueError, match="shots=120 is too many for cb.*over the model's context of 8192"):
        evaluate_classification("cb", model, tok, shots=120, n_samples=1, progress=False)
    with pytest.raises(ValueError, match="shots=1000 exceeds the 999 rows"):
        evaluate_classification("sst2", model, tok, shots=1000, n_samples=1, progress=False)
    with pytest.raises(ValueError, match="unknown intervention='nope'; known: .*head_mask"):
        evaluate_classification("sst2", model, tok, n_samples=1, intervention="nope")
    with pytest.raises(ValueError, match="select_by"):
        evaluate_classification("sst2", model, tok, n_samples=1, select_by="best")
    with pytest.raises(ValueError, match="unknown classification task"):
        evaluate_classification("sst3", model, tok, n_samples=1)
    with pytest.raises(ValueError, match="heads"):  # head_mask needs heads=: the error comes before any test pass
        evaluate_classification("sst2", model, tok, n_samples=1, intervention="head_mask", progress=False)
    assert get_intervention("head_mask") is INTERVENTIONS["head_mask"]


def test_cli_classification_with_intervention_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "sst2", "--shots", "1", "--samples", "5", "--intervention", "head_scale",
                 "--hyper", "heads=[[3, 1], [4, 2]]", "--hyper", "scale=0.5", "--json", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sst2 shots=1 seed=0 test split: 5 of 1821 rows" in printed
    assert "baseline" in printed and "head_scale" in printed and "(paired bootstrap)" in printed
    (res,) = json.loads(out.read_text())["results"]
    assert res["hyper"] == {"heads": [[3, 1], [4, 2]], "scale": 0.5}
    assert len(res["baseline"]["correct"]) == 5 and set(res["delta"]) >= {"uncalibrated", "calibrated_ci"}


def test_cli_classification_errors():
    with pytest.raises(SystemExit, match="unknown task.*classification tasks: agnews, cb, rte, sst2, trec"):
        main(["eval", "--task", "sst5"])
    with pytest.raises(SystemExit, match="--length do not apply to the classification task 'sst2'"):
        main(["eval", "--task", "sst2", "--length", "512"])
    with pytest.raises(SystemExit, match="classification tasks only"):
        main(["eval", "--task", "passkey", "--length", "512", "--shots", "4"])
    with pytest.raises(SystemExit, match="unknown intervention='actt'"):
        main(["eval", "--task", "sst2", "--intervention", "actt"])
    with pytest.raises(SystemExit, match="--hyper needs --intervention"):
        main(["eval", "--task", "sst2", "--hyper", "scale=2"])
    with pytest.raises(SystemExit, match="--samples and --dev-samples must be positive"):
        main(["eval", "--task", "sst2", "--samples", "0"])
