"""The eval runner and `attnlab eval` on the real SmolLM2-135M-Instruct."""
import json

import pytest

from attnlab.cli import main
from attnlab.eval import TASKS, EvalResult, Task, evaluate, get_task


def test_registry_names_every_task():
    assert set(TASKS) >= {"passkey", "needle", "multikey", "multivalue", "variable_tracking", "common_words"}
    assert all(isinstance(t, Task) for t in TASKS.values())


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task.*known tasks: common_words"):
        get_task("sst7")


def test_bad_arguments_fail_before_any_generation(smollm):
    model, tok = smollm
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        evaluate("passkey", model, tok, 9000, 1)
    with pytest.raises(ValueError, match="context"):
        evaluate("passkey", model, tok, 8190, 1)  # the answer's new tokens must fit too
    with pytest.raises(ValueError, match="n_samples"):
        evaluate("passkey", model, tok, 512, 0)
    with pytest.raises(ValueError, match="length"):
        evaluate("needle", model, tok, None, 1)
    with pytest.raises(ValueError, match="takes no parameter.*n_keys"):
        evaluate("passkey", model, tok, 512, 1, n_keys=3)
    with pytest.raises(ValueError, match="too small"):
        evaluate("needle", model, tok, 30, 1, progress=False)


def test_passkey_512_is_solved_by_smollm2(smollm):
    """Verified beforehand: SmolLM2-135M-Instruct finds both passkeys (seed 0) in a 512-token KJV haystack."""
    model, tok = smollm
    r = evaluate("passkey", model, tok, 512, 2, seed=0, progress=False)
    assert isinstance(r, EvalResult)
    assert [rec["score"] for rec in r.records] == [1.0, 1.0], r.records
    assert r.accuracy == 1.0 and r.ci95[1] == 1.0 and 0.3 < r.ci95[0] < 0.4
    assert all(rec["prediction"].strip().startswith(rec["answers"][0]) for rec in r.records)
    assert all(rec["prompt_tokens"] <= 512 for rec in r.records)
    assert "passkey length=512 samples=2 accuracy=1.000 (2/2) 95% CI [0.342, 1.000]" in r.summary()


def test_cli_eval_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "needle", "--length", "400", "--samples", "1", "--depth", "0.5",
                 "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "needle length=400 depth=0.5 samples=1" in printed and "95% CI" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "smollm2"
    (result,) = data["results"]
    assert result["task"] == "needle" and result["params"] == {"depth": 0.5}
    (rec,) = result["records"]
    assert rec["depth"] == 0.5 and rec["prompt_tokens"] <= 400 and rec["score"] == result["accuracy"]


def test_cli_errors_are_clear():
    with pytest.raises(SystemExit, match="unknown task"):
        main(["eval", "--task", "nope", "--length", "512"])
    with pytest.raises(SystemExit, match="--samples must be a positive integer; got 0"):
        main(["eval", "--task", "passkey", "--length", "512", "--samples", "0"])


def test_cli_checks_the_whole_grid_before_running(capsys):
    with pytest.raises(SystemExit, match="depth"):
        main(["eval", "--task", "needle", "--length", "300", "--depth", "0.5", "2", "--no-progress"])
    assert "accuracy" not in capsys.readouterr().out  # the valid first cell did not run either
