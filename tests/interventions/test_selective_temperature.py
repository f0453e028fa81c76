"""Selective temperature on SmolLM2: logits of the named layers scaled per query, exactly; others untouched."""
from __future__ import annotations

import math

import pytest
import torch

from attnlab.hf import attach
from attnlab.interventions.selective_temperature import QueryScale, selective_temperature, temperature_factor
from attnlab.probes.base import Observer

LAYER = 6


@pytest.fixture(scope="module")
def kjv(smollm):
    """(calibration prompts, held-out ids (1, 32)) from the bundled KJV Genesis text."""
    from importlib.resources import files

    _, tokenizer = smollm
    ids = tokenizer(files("attnlab.data").joinpath("kjv_genesis.txt").read_text()[:12000])["input_ids"]
    return [ids[0:40], ids[40:80]], torch.tensor([ids[2000:2032]])


class Maps(Observer):
    """Full (H, N, N) probability map of one layer, plus the worst |row sum - 1| of every layer."""

    def __init__(self, layer):
        self.layer, self.map, self.worst = layer, None, 0.0

    def observe(self, ctx, q_start, probs):
        self.worst = max(self.worst, float((probs.sum(-1) - 1).abs().max()))
        if ctx.layer == self.layer:
            self.map = probs[0].clone() if self.map is None else torch.cat([self.map, probs[0]], 1)


def run(model, ids, layer=LAYER):
    """(logits, Maps of ``layer``, {layer: (N, H, D) head outputs at the o_proj input})."""
    maps, heads, handles = Maps(layer), {}, []
    for i, block in enumerate(model.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: heads.__setitem__(i, a[0][0].view(a[0].shape[1], 9, -1).clone())))
    try:
        with attach(model, [maps]), torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, maps, heads


def softmax_scaled(p0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """softmax over visible keys of s_i * log p0 (H, N, N): p0's logits up to a row constant, scaled by s (H|1, N)."""
    logp = torch.where(p0 > 0, p0.double().clamp_min(1e-300).log(), -math.inf)
    return torch.softmax(s.double()[..., None] * logp, dim=-1)


def test_position_term_scales_logits_of_named_layer_exactly(smollm, kjv):
    model, _ = smollm
    _, ids = kjv
    _, base, base_heads = run(model, ids)
    alpha, ell = 0.5, 4.0
    with selective_temperature(model, alpha=alpha, ell=ell, layers=[LAYER]):
        _, mod, mod_heads = run(model, ids)
    n = ids.shape[1]
    s = 1 + alpha * torch.log1p(torch.arange(n, dtype=torch.float64) / ell)  # (N,)
    torch.testing.assert_close(mod.map.double(), softmax_scaled(base.map, s[None]), atol=2e-5, rtol=1e-4)
    assert mod.worst < 1e-5  # probabilities still sum to 1
    for layer in range(LAYER):
        assert torch.equal(mod_heads[layer], base_heads[layer])
    assert not torch.equal(mod_heads[LAYER], base_heads[LAYER])
    # the mechanism: later queries get sharper (lower-entropy) attention
    ent = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1)  # (H, N)
    assert bool((ent(mod.map)[:, n // 2:] < ent(base.map)[:, n // 2:] + 1e-6).all())
    assert float((ent(base.map) - ent(mod.map))[:, n // 2:].mean()) > 0.05


def test_norm_term_follows_the_documented_formula():
    q = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]], [[6.0, 8.0], [0.0, 0.5]]]])  # (B=1, N=2, H=2, D=2): norms 5,1 / 10,0.5
    factor = temperature_factor(alpha=0.0, gamma=0.5, ell=1.0, reference={0: torch.tensor([5.0, 1.0])})
    s = factor(0, q, torch.arange(2)[None])
    torch.testing.assert_close(s, torch.tensor([[[1.0, 1.0], [2 ** 0.5, 0.5 ** 0.5]]]))
    both = temperature_factor(alpha=1.0, gamma=0.0, ell=2.0, reference=None)(0, q, torch.tensor([[0, 2]]))
    torch.testing.assert_close(both, torch.tensor([[[1.0], [1 + math.log(2.0)]]]))


def test_norm_term_on_smollm_and_detach(smollm, kjv):
    model, _ = smollm
    calibration, ids = kjv
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with selective_temperature(model, None, calibration, alpha=0.0, gamma=0.0) as handle:
            assert torch.equal(model(input_ids=ids).logits, base)  # s = 1 is the unmodified model
        assert not handle.active
        with selective_temperature(model, None, calibration, alpha=0.0, gamma=1.0):
            changed = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, base)  # detach restored bit-identically
    assert (changed - base).abs().max() > 1e-2


def test_query_scale_per_head_changes_named_heads_only(smollm, kjv):
    model, _ = smollm
    _, ids = kjv
    _, base, base_heads = run(model, ids)
    vec = torch.ones(9)
    vec[[2, 7]] = torch.tensor([1.5, 0.5])
    with QueryScale(model, lambda layer, q, pos: vec, [LAYER]):
        _, mod, mod_heads = run(model, ids)
    assert mod.worst < 1e-5  # per-head scaling (head_modulation's "attention" mode): rows still sum to 1
    for h in range(9):
        same = torch.equal(mod_heads[LAYER][:, h], base_heads[LAYER][:, h])
        assert same == (h not in (2, 7)), h
    torch.testing.assert_close(mod.map.double(), softmax_scaled(base.map, vec[:, None].expand(9, ids.shape[1])),
                               atol=2e-5, rtol=1e-4)


def test_bad_arguments(smollm, minilm):
    model, _ = smollm
    with pytest.raises(ValueError, match="alpha"):
        selective_temperature(model, alpha=-0.1)
    with pytest.raises(ValueError, match="ell"):
        selective_temperature(model, ell=0.0)
    with pytest.raises(ValueError, match="gamma"):
        selective_temperature(model, gamma=float("nan"))
    with pytest.raises(ValueError, match="calibration"):
        selective_temperature(model, gamma=0.5)
    with pytest.raises(ValueError, match="layers"):
        selective_temperature(model, layers=[30])
    with pytest.raises(ValueError, match="self_attn"):
        selective_temperature(minilm[0], alpha=0.1)
