"""Retrieval heads (copy-paste score) and RazorAttention echo/induction scores: exact on constructed
inputs, equal to brute force over full eager attention maps of SmolLM2, CLI output, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnlab.analysis.echo_heads import (group_max, razor_head_scores, razor_probe_ids, razor_retrieval_heads,
                                         top_fraction)
from attnlab.analysis.induction import induction_scores
from attnlab.analysis.retrieval_heads import (RetrievalObserver, answer_span, copy_paste_score, greedy_top1_trace,
                                              needle_recall, retrieval_head_scores, stop_ids)
from attnlab.probes.base import CallContext
from attnlab.tasks import Sample, depth_grid, needle_grid

from diag_helpers import eager_maps


def ctx(layer: int, n_layers: int, n_q: int, n_kv: int) -> CallContext:
    return CallContext(layer=layer, n_layers=n_layers, module=torch.nn.Identity(), n_q=n_q, n_kv=n_kv,
                       q_positions=torch.arange(n_kv - n_q, n_kv), causal=True)


def one_hot_rows(targets: list[int], n_kv: int) -> torch.Tensor:
    """(1, H, 1, n_kv): head h puts 0.7 on key targets[h] and spreads the rest over the visible keys."""
    rows = torch.full((1, len(targets), 1, n_kv), 0.3 / n_kv)
    for h, t in enumerate(targets):
        rows[0, h, 0, t] += 0.7
    return rows


def test_copy_paste_score_on_constructed_attention():
    prompt = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])  # needle span [2, 6) holds tokens 7, 8, 9, 10
    span = (2, 6)
    generated = torch.tensor([7, 8, 99, 10])  # token 99 is not a needle token
    # plan[step][layer] = top-1 key of heads 0, 1, 2. Step 0 comes from a prefill-like call (8 queries),
    # steps 1-3 from one-query calls with 9, 10, 11 keys.
    plan = [[[2, 2, 0], [3, 7, 2]],
            [[3, 2, 0], [4, 8, 3]],
            [[4, 2, 0], [5, 9, 4]],
            [[5, 2, 0], [6, 10, 5]]]
    # L0 h0 follows the needle: events at steps 0, 1, 3 (step 2 generates 99) -> 3/4
    # L0 h1 stays on key 2 (token 7): an event only at step 0 -> 1/4;  L0 h2 looks outside the span -> 0
    # L1 h0 looks one key late (wrong token, then outside the span) -> 0
    # L1 h1 looks at key 7 and at generated tokens (keys >= 8, outside the prompt) -> 0;  L1 h2 = L0 h0 -> 3/4
    want = torch.tensor([[3 / 4, 1 / 4, 0.0], [0.0, 0.0, 3 / 4]], dtype=torch.float64)
    obs = RetrievalObserver()
    for layer in (0, 1):
        obs.observe(ctx(layer, 2, 8, 8), 0, torch.ones(1, 3, 4, 8))  # not the chunk with the last row: ignored
        last = torch.cat([torch.zeros(1, 3, 3, 8), one_hot_rows(plan[0][layer], 8)], 2)
        obs.observe(ctx(layer, 2, 8, 8), 4, last)
    for step in range(1, 4):
        for layer in (0, 1):
            obs.observe(ctx(layer, 2, 1, 8 + step), 0, one_hot_rows(plan[step][layer], 8 + step))
    top1 = obs.top1()
    assert top1.shape == (1, 4, 2, 3)
    assert top1[0].tolist() == plan
    score = copy_paste_score(top1[0], generated, prompt, span)
    assert torch.equal(score, want), score


def brute_force_score(top1, generated, prompt, span) -> torch.Tensor:
    """The paper's loop, literally: per step, layer, head, add 1/|needle| on a copy-paste event."""
    steps, layers, heads = top1.shape
    out = torch.zeros(layers, heads, dtype=torch.float64)
    for s in range(steps):
        for l in range(layers):
            for h in range(heads):
                i = int(top1[s, l, h])
                if span[0] <= i < span[1] and int(prompt[i]) == int(generated[s]):
                    out[l, h] += 1 / (span[1] - span[0])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 5), st.integers(2, 20), st.data())
def test_copy_paste_score_matches_loop(steps, layers, heads, n, data):
    start = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(start + 1, n))
    vocab = data.draw(st.integers(1, 6))  # few ids: many repeated tokens and chance matches
    prompt = torch.tensor(data.draw(st.lists(st.integers(0, vocab), min_size=n, max_size=n)))
    generated = torch.tensor(data.draw(st.lists(st.integers(0, vocab), min_size=steps, max_size=steps)))
    top1 = torch.tensor(data.draw(st.lists(st.integers(0, n + steps - 1), min_size=steps * layers * heads,
                                           max_size=steps * layers * heads))).view(steps, layers, heads)
    got = copy_paste_score(top1, generated, prompt, (start, end))
    assert torch.allclose(got, brute_force_score(top1, generated, prompt, (start, end)), atol=1e-12)


def test_needle_recall_is_rouge1_recall_over_tokens():
    assert needle_recall([1, 2, 3], [1, 2, 3, 4]) == 0.75
    assert needle_recall([1, 1, 1], [1, 1, 2]) == 2 / 3  # multiset: each needle token at most once
    assert needle_recall([], [5]) == 0.0


@pytest.fixture(scope="module")
def short_needle(smollm):
    """The one sample `attnlab heads retrieval --samples 1 --length 160` scores (depth 0.5, seed 0)."""
    _, tok = smollm
    return needle_grid(tok, [160], depth_grid(1), 1, seed=0)[0]


@pytest.fixture(scope="module")
def needle_trace(smollm, short_needle):
    """(generated ids, top1 (S, L, H)) of greedy decoding on ``short_needle`` under the observer."""
    model, tok = smollm
    return greedy_top1_trace(model, short_needle.input_ids, 12, stop_ids=stop_ids(model, tok), tokenizer=tok)


def test_observer_equals_brute_force_over_full_maps(smollm, short_needle, needle_trace):
    model, tok = smollm
    s = short_needle
    gen, top1 = needle_trace
    span = answer_span(tok, s)
    assert tok.decode(list(s.input_ids[span[0]:span[1]])).strip() == s.answers[0]
    # decoding is plain greedy: the same tokens as transformers' generate
    ids = torch.tensor([s.input_ids])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(gen), do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert ref[0, ids.shape[1]:].tolist() == gen
    assert s.answers[0] in tok.decode(gen)
    # brute force: every layer's full (N, N) eager map of prompt + generated tokens; the row of the
    # query that generated token t sits at position len(prompt) - 1 + t
    full = torch.tensor([list(s.input_ids) + gen[:-1]])
    maps = eager_maps(model, input_ids=full)
    n = len(s.input_ids)
    rows = torch.stack([m[0, :, n - 1:, :] for m in maps], 0)  # (L, H, S, N)
    want_top1 = rows.argmax(-1).permute(2, 0, 1)  # (S, L, H)
    mismatch = (want_top1 != top1).nonzero().tolist()
    for st_, l, h in mismatch:  # only a numerical near-tie may differ between eager and the exact path
        row = rows[l, h, st_]
        assert abs(float(row[top1[st_, l, h]] - row[want_top1[st_, l, h]])) < 1e-5
    assert len(mismatch) <= 2, mismatch
    want = brute_force_score(want_top1, torch.tensor(gen), torch.tensor(s.input_ids), span)
    got = copy_paste_score(top1, torch.tensor(gen), torch.tensor(s.input_ids), span)
    assert torch.allclose(got, want, atol=2 / (span[1] - span[0]) * len(mismatch) + 1e-12)
    # some head copies the needle, and retrieval heads are few
    assert got.max() >= 0.5
    assert 0 < float((got > 0.1).double().mean()) < 0.25


def test_sample_that_fails_recall_is_not_counted(smollm, short_needle):
    model, tok = smollm
    s = short_needle
    # the model cannot answer before it has seen anything: a 1-token budget recalls at most 1/7 of the needle
    result = retrieval_head_scores(model, tok, [s], max_new_tokens=1, progress=False)
    assert result.n_counted == 0 and result.records[0]["counted"] is False
    assert torch.equal(result.scores, torch.zeros_like(result.scores))


def test_heads_retrieval_cli_writes_json_and_png(smollm, short_needle, needle_trace, tmp_path, monkeypatch):
    import attnlab.hf
    from attnlab.cli import main

    monkeypatch.setattr(attnlab.hf, "load", lambda name=None, **kw: smollm)  # the session's model, not a reload
    out = tmp_path / "heads"
    assert main(["heads", "retrieval", "--samples", "1", "--length", "160", "--out", str(out),
                 "--no-progress"]) == 0
    data = json.loads((out / "retrieval_heads.json").read_text())
    assert data["n_layers"] == 30 and data["n_heads"] == 9
    assert len(data["scores"]) == 30 and all(len(r) == 9 for r in data["scores"])
    assert data["fraction_above_threshold"] == pytest.approx(
        sum(v > 0.1 for r in data["scores"] for v in r) / 270)
    assert data["samples"][0]["length"] == 160 and data["samples"][0]["depth"] == 0.5
    # the whole pipeline (retrieval_head_scores) gives exactly the observer trace's per-head scores
    gen, top1 = needle_trace
    span = answer_span(smollm[1], short_needle)
    assert data["samples"][0]["needle_span"] == list(span)
    assert data["n_counted"] == 1 and data["samples"][0]["correct"] == 1.0
    assert data["scores"] == copy_paste_score(top1, torch.tensor(gen), torch.tensor(short_needle.input_ids),
                                              span).tolist()
    assert [tuple(p) for p in data["retrieval_heads"]] == sorted(
        [(l, h) for l in range(30) for h in range(9) if data["scores"][l][h] > 0.1],
        key=lambda p: -data["scores"][p[0]][p[1]])
    png = (out / "retrieval_heads.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "retrieval_heads.png") as im:
        assert im.size[0] > 200 and im.size[1] > 300


@pytest.mark.parametrize("argv, message", [
    (["--samples", "0"], "--samples"),
    (["--length", "-5"], "--length"),
    (["--min-recall", "1.5"], "--min-recall"),
])
def test_heads_retrieval_cli_errors(tmp_path, argv, message):
    from attnlab.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["heads", "retrieval", "--out", str(tmp_path), *argv])


def test_clear_errors(smollm, short_needle):
    model, tok = smollm
    with pytest.raises(ValueError, match="samples"):
        retrieval_head_scores(model, tok, [])
    with pytest.raises(ValueError, match="min_recall"):
        retrieval_head_scores(model, tok, [short_needle], min_recall=1.0)
    with pytest.raises(ValueError, match="span"):
        copy_paste_score(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                         torch.zeros(4, dtype=torch.long), (3, 9))
    bad = Sample(short_needle.prompt, short_needle.input_ids, ("0000000",), {})
    with pytest.raises(ValueError, match="not found"):
        answer_span(tok, bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_top1_trace(model, short_needle.input_ids, 0)
    with pytest.raises(ValueError, match="period"):
        razor_head_scores(model, period=1)
    with pytest.raises(ValueError, match="n_repeats"):
        razor_probe_ids(model, period=8, n_repeats=1)
    with pytest.raises(ValueError, match="context"):
        razor_probe_ids(model, period=4096, n_repeats=4)
    with pytest.raises(ValueError, match="induction_frac"):
        razor_retrieval_heads({"induction": torch.zeros(2, 2), "echo": torch.zeros(2, 2)}, induction_frac=1.5)
    with pytest.raises(ValueError, match="lacks"):
        razor_retrieval_heads({"induction": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="groups"):
        group_max(torch.zeros(2, 9), 2)


def test_razor_head_scores_equal_full_maps(smollm):
    model, tok = smollm
    period, repeats = 16, 3
    before = model.config._attn_implementation
    scores = razor_head_scores(model, period=period, n_repeats=repeats, seed=2, tokenizer=tok, chunk=7)
    assert model.config._attn_implementation == before  # attached only while scoring
    ids = razor_probe_ids(model, period=period, n_repeats=repeats, seed=2, tokenizer=tok)
    assert ids.shape == (1, 1 + period * repeats) and int(ids[0, 0]) == tok.bos_token_id
    ref = induction_scores(eager_maps(model, input_ids=ids), period, prefix=1)
    for name in ("echo", "induction"):
        want = torch.tensor(ref[name], dtype=torch.float64)
        assert scores[name].shape == (30, 9)
        assert torch.allclose(scores[name], want, atol=1e-5)
        # GQA: SmolLM2's 9 query heads share 3 KV heads in runs of 3
        assert torch.allclose(scores[f"{name}_kv"], want.view(30, 3, 3).amax(-1), atol=1e-5)
    assert scores["induction"].max() > 0.3  # real induction heads exist (measured ~0.6 at period 128)
    protected = razor_retrieval_heads(scores)
    assert protected.shape == (30, 9)
    n_ind, n_echo = 38, 3  # ceil(0.14 * 270), ceil(0.01 * 270)
    assert n_ind <= int(protected.sum()) <= n_ind + n_echo
    assert protected[scores["induction"] == scores["induction"].max()].all()
    assert razor_retrieval_heads(scores, kv=True).shape == (30, 3)


def test_top_fraction_counts():
    score = torch.tensor([[0.1, 0.5], [0.3, 0.2]])
    assert top_fraction(score, 0.5).tolist() == [[False, True], [True, False]]
    assert top_fraction(score, 0.0).sum() == 0
    assert top_fraction(score, 0.01).sum() == 1  # at least one head for any positive fraction
