"""`attnlab inspect` end to end on the real embedded models, its error messages, and the page in Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from attnlab.cli import main
from attnlab.report.inspect import default_text

XSS = "<script>alert(1)</script>"
PROMPT = (f"The cat sat on the mat. {XSS} The dog & the bird said \"hi\". "
          "In the beginning God created the heaven and the earth. The cat sat on the mat.")


@pytest.fixture(scope="module")
def smollm_report(tmp_path_factory):
    """Runs the real command once on SmolLM2 with a short prompt holding a script tag."""
    out = tmp_path_factory.mktemp("inspect")
    rc = main(["inspect", "--prompt", PROMPT, "--out", str(out), "--chunk", "16"])  # with the progress bar
    assert rc == 0
    return out, json.loads((out / "report.json").read_text()), (out / "report.html").read_text()


def test_json_has_every_section(smollm_report):
    _, report, _ = smollm_report
    meta, diag = report["meta"], report["diagnostics"]
    assert meta["model"] == "smollm2" and (meta["n_layers"], meta["n_heads"]) == (30, 9)
    assert meta["n_tokens"] == len(diag["input"]["tokens"]) and meta["tokens_dropped"] == 0
    assert "".join(diag["input"]["tokens"]).startswith("The cat sat")
    for section in ("per_head", "per_layer", "sinks", "hidden_sinks", "massive_activations", "head_stats",
                    "prev_token", "induction", "layer_redundancy", "thumbnails"):
        assert section in diag, f"report.json lacks {section}; has {sorted(diag)}"
    alpha = diag["per_head"]["sink_alpha_first"]
    assert len(alpha) == 30 and all(len(row) == 9 for row in alpha)
    assert 0.0 <= diag["sinks"]["sink_ratio"] <= 1.0
    chosen = report["attention_maps"]["chosen"]
    assert chosen and all(len(c["map"]) == meta["n_tokens"] for c in chosen)  # short input: one cell per token
    m = chosen[0]["map"]  # causal: the future is masked (None), each row's visible cells sum to 1
    assert m[0][1] is None and m[-1][-1] is not None
    assert all(abs(sum(x for x in row if x is not None) - 1.0) < 1e-3 for row in m)
    for name in ("sink tokens", "hidden sinks", "massive activations"):
        assert isinstance(report["tables"][name], list)


def test_html_is_self_contained_and_escapes_text(smollm_report):
    _, _, page = smollm_report
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()  # the page runs no script at all
    for remote in ("http://", "https://", "//cdn", "@import"):
        assert remote not in page.replace("http://www.w3.org/2000/svg", "")
    assert "<svg" in page and "data:image/png;base64," in page
    assert len(page.encode()) < 2_000_000


def test_page_renders_in_headless_chromium(smollm_report):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    out, _, _ = smollm_report
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={out / 'chromium-profile'}", "--dump-dom", f"file://{out / 'report.html'}"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "attnlab inspect: smollm2" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # the prompt is text in the DOM ...
    assert "<script" not in dom.lower()  # ... and no script element exists


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--text", "--prompt", "--max-tokens", "--out", "--chunk", "--ablation", "--heads"):
        assert flag in text


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unknown_model_is_one_line(capsys, tmp_path):
    assert main(["inspect", "--model", "no-such-model", "--prompt", "hi", "--out", str(tmp_path)]) == 2
    assert "unknown model" in _error_line(capsys)


def test_empty_text_is_one_line(capsys, tmp_path):
    assert main(["inspect", "--prompt", " \n ", "--out", str(tmp_path)]) == 2
    assert "empty" in _error_line(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["inspect", "--text", str(empty), "--out", str(tmp_path)]) == 2
    assert "empty" in _error_line(capsys)


def test_text_longer_than_context_is_one_line(capsys, tmp_path):
    # all-MiniLM-L6-v2 has 512 positions; the default text has thousands of tokens.
    assert main(["inspect", "--model", "minilm", "--max-tokens", "5000", "--out", str(tmp_path)]) == 2
    err = _error_line(capsys)
    assert "512" in err and "--max-tokens" in err


def test_long_text_is_truncated_with_a_note(capsys, tmp_path):
    text = tmp_path / "genesis.txt"
    text.write_text(default_text()[:4000])
    assert main(["inspect", "--model", "minilm", "--text", str(text), "--max-tokens", "64", "--quiet",
                 "--heads", "2.3,5.11", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    dropped = report["meta"]["tokens_dropped"]
    assert report["meta"]["n_tokens"] == 64 and dropped > 0
    assert f"dropping the last {dropped}" in err
    chosen = report["attention_maps"]["chosen"]
    assert [(c["layer"], c["head"]) for c in chosen] == [(2, 3), (5, 11)]
    # An encoder: no causal mask, so the keys after each query get attention too; rows sum to 1.
    m = chosen[0]["map"]
    assert len(m) == 64 and sum(m[0][1:]) > 0.01
    assert all(abs(sum(row) - 1.0) < 1e-3 for row in m)


def test_ablation_on_an_encoder_is_one_line(capsys, tmp_path):
    assert main(["inspect", "--model", "minilm", "--prompt", "hello world", "--ablation", "--out", str(tmp_path)]) == 2
    assert "--ablation" in _error_line(capsys)


def test_unknown_head_is_one_line(capsys, tmp_path):
    assert main(["inspect", "--model", "minilm", "--prompt", "hello world", "--heads", "9.0",
                 "--out", str(tmp_path)]) == 2
    assert "--heads 9.0" in _error_line(capsys)


def test_incompatible_model_is_one_line(capsys, tmp_path, minilm):
    # BLOOM's attention does not go through transformers' AttentionInterface. A 2-layer BLOOM with
    # random weights (with MiniLM's real tokenizer) is a genuine model directory of that architecture.
    transformers = pytest.importorskip("transformers")
    _, tokenizer = minilm
    config = transformers.BloomConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, n_layer=2, n_head=2)
    transformers.BloomForCausalLM(config).save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    assert main(["inspect", "--model", str(tmp_path / "bloom"), "--prompt", "hello", "--out", str(tmp_path)]) == 2
    assert "AttentionInterface" in _error_line(capsys)


def test_layer_progress_counts_layers_and_removes_its_hooks(smollm, capsys):
    import torch

    from attnlab.hf import attention_layers
    from attnlab.report.inspect import layer_progress

    model, tokenizer = smollm
    ids = tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    # transformers installs output-capturing hooks of its own once output_attentions was used
    # (earlier tests on this shared model do); compare against what was there before.
    hooks_before = [dict(m._forward_hooks) for m in attention_layers(model).values()]
    with torch.no_grad():
        before = model(ids).logits
        with layer_progress(model, total=30):
            during = model(ids).logits
        after = model(ids).logits
    assert "30/30" in capsys.readouterr().err
    assert [dict(m._forward_hooks) for m in attention_layers(model).values()] == hooks_before
    assert torch.equal(before, during) and torch.equal(before, after)
