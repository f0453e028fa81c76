"""attach shows score_bias modifiers the call's values (ctx.extra["value"]) next to its query and key."""
from __future__ import annotations

from importlib import resources

import torch

from attnlab.hf.attach import attach
from attnlab.interventions.base import Modifier


class _Grab(Modifier):
    def __init__(self):
        self.qkv, self.scaling = {}, {}

    def score_bias(self, ctx):
        self.qkv[ctx.layer] = tuple(ctx.extra[n].detach().clone() for n in ("query", "key", "value"))
        self.scaling[ctx.layer] = ctx.scaling
        return None


def test_query_key_value_reproduce_the_attention_output_on_smollm(smollm):
    model, tok = smollm
    text = resources.files("attnlab.data").joinpath("kjv_genesis.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :40]
    outs = {}
    hooks = [model.model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, out, i=i: outs.__setitem__(i, out[0].detach())) for i in (0, 17, 29)]
    grab = _Grab()
    try:
        with torch.no_grad(), attach(model, modifiers=[grab]):
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for i, out in outs.items():
        q, k, v = (t.double() for t in grab.qkv[i])
        hq, hkv = q.shape[1], v.shape[1]
        assert v.shape == k.shape[:3] + (v.shape[-1],) and hkv == model.config.num_key_value_heads
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        n = q.shape[2]
        s = (q @ k.transpose(-1, -2) * grab.scaling[i]).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        heads = s.softmax(-1) @ v  # (B, Hq, N, Dv)
        ref = heads.transpose(1, 2).reshape(1, n, -1) @ model.model.layers[i].self_attn.o_proj.weight.double().T
        assert (ref - out.double()).abs().max().item() < 1e-4, i
    assert all(grab.qkv[i][2].shape[1] == 3 for i in grab.qkv)
