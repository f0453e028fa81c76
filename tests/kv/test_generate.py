"""Generation under each policy on the real SmolLM2: runs, keeps what it must, saves real bytes."""
from __future__ import annotations

import pytest
import torch

from attnlab import kv
from attnlab.kv.evaluate import decode, record_prefill
from attnlab.tasks import make_needle

# A few protected KV heads (layer, kv_head) among those RazorAttention's scores rank first on SmolLM2;
# given directly so the test does not spend minutes computing the scores.
PROTECTED = torch.tensor([[14, 1], [18, 2], [17, 1], [23, 0]])
NEW = 8


def make(name: str, budget: float = 0.3) -> kv.Policy:
    if name == "full":
        return kv.Full()
    if name == "razor":
        return kv.Razor(budget=budget, protected=PROTECTED, min_window=8)
    return kv.make_policy(name, budget=budget)


@pytest.fixture(scope="module")
def prompt(smollm):
    _, tok = smollm
    s = make_needle(tok, length=256, n_samples=1, seed=3)[0]
    return torch.tensor([s.input_ids])


def plain_generate(model, ids, mask=None, new=NEW):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=new, do_sample=False, pad_token_id=0)


def test_full_policy_equals_plain_generate(smollm, prompt):
    model, _ = smollm
    out, cache = kv.generate(model, prompt, kv.Full(), max_new_tokens=16)
    assert torch.equal(out, plain_generate(model, prompt, new=16))
    assert cache.kept_bytes() == cache.full_bytes()
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("name", ["streaming", "snapkv", "h2o", "razor"])
def test_policy_generates_and_saves_bytes(smollm, prompt, name):
    model, _ = smollm
    T = prompt.shape[1]
    policy = make(name)
    out, cache = kv.generate(model, prompt, policy, max_new_tokens=NEW, min_new_tokens=NEW)
    assert out.shape == (1, T + NEW)
    assert 0.2 < cache.kept_fraction() < 0.4, cache.kept_fraction()
    assert cache.allocated_bytes() < 0.5 * cache.full_bytes()
    n_seen = T + NEW - 1  # the last token is produced, never fed back
    for layer in cache.layers:
        assert layer.get_seq_length() == n_seen
        for g in layer.groups:
            pos = g.pos[:, : g.n]
            if name == "streaming":  # sinks and the newest tokens are never evicted
                assert (pos[:, :4] == torch.arange(4)).all()
                assert (pos.max(1).values == n_seen - 1).all()
            if name == "h2o":  # the newest token is always there, the size is the budget's
                assert (pos.max(1).values == n_seen - 1).all() and g.n == policy.n_keep(T)
            if name == "razor" and g.n >= T:  # protected heads keep every token
                assert (pos.sort(1).values == torch.arange(n_seen)).all()
    if name == "razor":
        rows = sum(g.size for g in cache.layers[14].groups if g.n >= T)
        assert rows == 1  # layer 14: KV head 1 protected


@pytest.mark.parametrize("name", ["snapkv", "h2o", "razor"])
def test_batch_of_two_left_padded_equals_each_alone(smollm, name):
    model, tok = smollm
    samples = make_needle(tok, length=200, n_samples=2, seed=5)
    ids = [torch.tensor(s.input_ids) for s in samples]
    ids[1] = ids[1][:150]  # different lengths: left padding on the second
    T = max(len(x) for x in ids)
    batch = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, T - len(x):], mask[i, T - len(x):] = x, 1
    out, cache = kv.generate(model, batch, make(name), attention_mask=mask, max_new_tokens=6,
                              min_new_tokens=6, pad_token_id=0)
    for i, x in enumerate(ids):
        alone, _ = kv.generate(model, x.view(1, -1), make(name), max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        assert out[i, T:].tolist() == alone[0, len(x):].tolist()
    # padding is never stored: rows of the shorter sample keep fewer entries
    n_by_row = {int(r): g.n for g in cache.layers[0].groups for r in g.rows}
    assert n_by_row[3] < n_by_row[0]


@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_one_recorded_prefill_serves_each_policy(smollm, prompt, name):
    model, tok = smollm
    inline, _ = kv.generate(model, prompt, make(name), max_new_tokens=NEW)
    with kv.apply(model, None) as session:
        rec, logits, _ = record_prefill(model, prompt, frozenset({"window", "all"}), session)
        rows, _, _ = decode(model, prompt, logits[:1].argmax(-1), rec.compressed(make(name)), NEW, [-1], 0)
    assert rows == [inline[0, prompt.shape[1]:].tolist()]


def test_session_restores_model_and_rejects_nesting(smollm, prompt):
    model, _ = smollm
    with kv.apply(model, "streaming", budget=0.5):
        with pytest.raises(ValueError, match="already"):
            kv.apply(model, "full")
    with torch.no_grad():
        logits = model(prompt).logits
    with kv.apply(model, "full"):
        with torch.no_grad():  # no RaggedCache passed: plain SDPA, same logits
            torch.testing.assert_close(model(prompt, use_cache=False).logits, logits)
