"""EchoAtt on SmolLM2: a sharing layer runs on its anchor's probabilities (matched heads) and its own V."""
from __future__ import annotations

import pytest
import torch

from attnlab.hf import attach
from attnlab.interventions.echoatt import EchoAttention, echoatt, head_overlap, share_groups
from attnlab.probes.base import Observer

ANCHOR, SHARER = 5, 6


@pytest.fixture(scope="module")
def kjv(smollm):
    """(calibration prompts, held-out ids (1, 24)) from the bundled KJV Genesis text."""
    from importlib.resources import files

    _, tokenizer = smollm
    ids = tokenizer(files("attnlab.data").joinpath("kjv_genesis.txt").read_text()[:12000])["input_ids"]
    return [ids[0:32], ids[32:64]], torch.tensor([ids[2000:2024]])


class Maps(Observer):
    """Full (H, N, N) map of every layer (short inputs only)."""

    def __init__(self):
        self.maps = {}

    def observe(self, ctx, q_start, probs):
        prev = self.maps.get(ctx.layer)
        self.maps[ctx.layer] = probs[0].clone() if q_start == 0 or prev is None else torch.cat([prev, probs[0]], 1)


def run(model, ids, modifiers=(), observe=True):
    """(logits, Maps or None, {layer: (N, H, D) head outputs}, {layer: (N, H_kv, D) values})."""
    maps, heads, values, handles = Maps() if observe else None, {}, {}, []
    for i, block in enumerate(model.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: heads.__setitem__(i, a[0][0].view(a[0].shape[1], 9, -1).clone())))
        handles.append(block.self_attn.v_proj.register_forward_hook(
            lambda m, a, o, i=i: values.__setitem__(i, o[0].view(o.shape[1], 3, -1).clone())))
    try:
        with attach(model, [maps] if observe else [], modifiers=list(modifiers)), torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, maps, heads, values


def test_head_overlap_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 5, 7, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(4, 5, 7, generator=g, dtype=torch.float64), -1)
    o = head_overlap(p, q)
    assert o.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            expect = sum(sum(min(float(p[a, i, j]), float(q[b, i, j])) for j in range(7)) for i in range(5)) / 5
            assert abs(float(o[a, b]) - expect) < 1e-12
    assert torch.allclose(head_overlap(p, p).diagonal(), torch.ones(3, dtype=torch.float64))
    assert bool((o >= 0).all() and (o <= 1 + 1e-12).all())


def test_share_groups_greedy_threshold_and_cap():
    h = 2
    sim = {(1, 2): 0.9, (1, 3): 0.85, (1, 4): 0.5, (4, 5): 0.95, (2, 3): 0.99, (2, 4): 0.1, (3, 4): 0.1,
           (3, 5): 0.1, (2, 5): 0.1, (1, 5): 0.1}
    overlap = {pair: torch.full((h, h), s) for pair, s in sim.items()}
    overlap[(1, 2)] = torch.tensor([[0.9, 0.2], [0.3, 0.9]])  # head 0 <- 0, head 1 <- 1
    overlap[(1, 3)] = torch.tensor([[0.1, 0.85], [0.85, 0.1]])  # crossed: head 0 <- 1, head 1 <- 0
    groups = share_groups(overlap, 7, threshold=0.8, max_span=3)
    assert groups == {2: (1, [0, 1]), 3: (1, [1, 0]), 5: (4, [0, 0])}  # layer 4 starts a new group
    assert share_groups(overlap, 7, threshold=0.8, max_span=3, max_shared=1) == {5: (4, [0, 0])}
    assert share_groups(overlap, 7, threshold=0.8, max_span=1) == {2: (1, [0, 1]), 5: (4, [0, 0])}
    assert share_groups(overlap, 7, threshold=0.999) == {}


def test_sharing_layer_uses_anchor_probs_and_its_own_values(smollm, kjv):
    model, _ = smollm
    _, ids = kjv
    heads = [8, 7, 6, 5, 4, 3, 2, 1, 0]  # a permutation, so that a wrong matching would show
    echo = EchoAttention({SHARER: (ANCHOR, heads)})
    assert echo.layers == {ANCHOR, SHARER}
    base_logits, _, base_out, _ = run(model, ids, observe=False)
    logits, _, out, _ = run(model, ids, [echo], observe=False)
    for layer in range(ANCHOR):  # layers outside the modifier keep SDPA: bit-identical
        assert torch.equal(out[layer], base_out[layer])
    torch.testing.assert_close(out[ANCHOR], base_out[ANCHOR], atol=1e-5, rtol=1e-4)  # exact path, same maths
    assert not torch.allclose(out[SHARER], base_out[SHARER], atol=1e-3)
    assert not torch.allclose(logits, base_logits, atol=1e-3)

    _, mod, out, values = run(model, ids, [echo])
    assert torch.equal(mod.maps[SHARER], mod.maps[ANCHOR][heads])  # observers see the shared probabilities
    assert float((mod.maps[SHARER].sum(-1) - 1).abs().max()) < 1e-5
    # the sharing layer's output is the anchor's (matched) probabilities times its own values, in float64
    p = mod.maps[SHARER].double()  # (H, N, N)
    v = values[SHARER].double().transpose(0, 1).repeat_interleave(3, dim=0)  # (H, N, D): query head h reads kv head h // 3
    torch.testing.assert_close(out[SHARER].double().transpose(0, 1), p @ v, atol=1e-5, rtol=1e-4)
    assert echo._store == {}  # the anchor's probabilities were freed after its last sharing layer


def test_echoatt_from_calibration_and_detach(smollm, kjv):
    model, _ = smollm
    calibration, ids = kjv
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with echoatt(model, None, calibration, threshold=0.5, max_shared=2, max_tokens=32) as handle:
            shared = model(input_ids=ids).logits
            assert len(handle.shares) == 2
            for layer, (anchor, heads) in handle.shares.items():
                assert 1 <= anchor < layer <= 28 and len(heads) == 9
                assert handle.similarity[(anchor, layer)] >= 0.5
            assert set(handle.modifiers[0].layers) == set(handle.shares) | {a for a, _ in handle.shares.values()}
        assert torch.equal(model(input_ids=ids).logits, base)  # detach restored bit-identically
        with echoatt(model, None, calibration[:1], threshold=1.0, max_tokens=16) as handle:  # nothing similar enough
            assert handle.shares == {} and torch.equal(model(input_ids=ids).logits, base)
    assert not torch.allclose(shared, base, atol=1e-3)


def test_bad_arguments(smollm):
    model, _ = smollm
    with pytest.raises(ValueError, match="threshold"):
        echoatt(model, None, [[1, 2, 3]], threshold=1.5)
    with pytest.raises(ValueError, match="max_span"):
        echoatt(model, None, [[1, 2, 3]], max_span=0)
    with pytest.raises(ValueError, match="max_shared"):
        echoatt(model, None, [[1, 2, 3]], max_shared=-1)
    with pytest.raises(ValueError, match="calibration"):
        echoatt(model, None, [])
    with pytest.raises(ValueError, match="anchor must come before"):
        EchoAttention({3: (5, range(9))})
    with pytest.raises(ValueError, match="cannot itself share"):
        EchoAttention({3: (2, range(9)), 4: (3, range(9))})


def test_fused_form_matches_the_exact_path_also_while_decoding(smollm, kjv):
    """echoatt() attaches FusedEchoAttention (SDPA everywhere): same logits as EchoAttention's exact path,
    for a prefill and for cached decoding steps (values then come from the KV cache)."""
    from transformers import DynamicCache

    from attnlab.interventions.echoatt import FusedEchoAttention, attach_fused

    model, _ = smollm
    _, ids = kjv
    shares = {SHARER: (ANCHOR, [8, 7, 6, 5, 4, 3, 2, 1, 0]), SHARER + 2: (ANCHOR, [0] * 9)}

    def decode(make):
        with make(), torch.no_grad():
            cache = DynamicCache()
            out = [model(input_ids=ids[:, :20], past_key_values=cache, use_cache=True).logits]
            for t in range(20, 24):
                out.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
            return torch.cat(out, 1)

    exact = decode(lambda: attach(model, modifiers=[EchoAttention(shares)]))
    fused = decode(lambda: attach_fused(model, FusedEchoAttention(shares)))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with attach_fused(model, FusedEchoAttention(shares)):
            prefill = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, base)  # detach removed the hooks and the attachment
    torch.testing.assert_close(fused, exact, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(prefill, exact, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(prefill, base, atol=1e-3)
