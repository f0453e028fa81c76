"""Head modulation on SmolLM2: a stable measured sensitivity; only the chosen heads change; detach restores."""
from __future__ import annotations

import pytest
import torch

from attnlab.interventions.head_modulation import head_modulation, head_sensitivity, modulation_scales


@pytest.fixture(scope="module")
def kjv(smollm):
    """(two disjoint calibration sets, held-out ids (1, 32)) from the bundled KJV Genesis text."""
    from importlib.resources import files

    _, tokenizer = smollm
    ids = tokenizer(files("attnlab.data").joinpath("kjv_genesis.txt").read_text()[:30000])["input_ids"]
    return [ids[0:40], ids[40:80]], [ids[4000:4040], ids[4040:4080]], torch.tensor([ids[2000:2032]])


@pytest.fixture(scope="module")
def sensitivity(smollm, kjv):
    return head_sensitivity(smollm[0], kjv[0])


def head_outputs(model, ids):
    """(logits, {layer: (N, H, D) head outputs at the o_proj input})."""
    heads, handles = {}, []
    for i, block in enumerate(model.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: heads.__setitem__(i, a[0][0].view(a[0].shape[1], 9, -1).clone())))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, heads


def test_sensitivity_is_a_stable_head_property(smollm, kjv, sensitivity):
    """Measured on disjoint text, the head ranking agrees (a random ranking would give ~0)."""
    other = head_sensitivity(smollm[0], kjv[1])
    assert sensitivity.shape == (30, 9) and bool((sensitivity >= 0).all()) and bool(sensitivity.isfinite().all())
    rank = lambda v: v.flatten().argsort().argsort().double()
    spearman = float(torch.corrcoef(torch.stack([rank(sensitivity), rank(other)]))[0, 1])
    assert spearman > 0.6  # measured 0.8 with 3 prompts per set


def test_modulation_scales_are_differential():
    d = torch.tensor([[1.0, 4.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert modulation_scales(d, alpha=2.0, per_layer=2, layers=[0]) == {(0, 1): 2.0, (0, 2): 1.5}
    assert modulation_scales(d, alpha=0.5, per_layer=1) == {(0, 1): 0.5, (1, 0): 0.5}


@pytest.mark.parametrize("mode", ["output", "attention"])
def test_only_chosen_heads_change(smollm, kjv, sensitivity, mode):
    model, _ = smollm
    _, _, ids = kjv
    base_logits, base = head_outputs(model, ids)
    with head_modulation(model, alpha=2.0, per_layer=2, mode=mode, layers=[7], sensitivity=sensitivity) as handle:
        logits, mod = head_outputs(model, ids)
        chosen = sorted(handle.scales)
    assert [layer for layer, _ in chosen] == [7, 7]
    top = int(handle.sensitivity[7].argmax())
    assert handle.scales[(7, top)] == 2.0
    for layer in range(7):
        assert torch.equal(mod[layer], base[layer])
    for h in range(9):
        assert torch.equal(mod[7][:, h], base[7][:, h]) == ((7, h) not in handle.scales), h
    if mode == "output":  # VHR form: the head's output times its scale
        torch.testing.assert_close(mod[7][:, top], 2.0 * base[7][:, top])
    assert not torch.equal(logits, base_logits)
    assert torch.equal(head_outputs(model, ids)[0], base_logits)  # detach restored bit-identically


def test_bad_arguments(smollm, kjv):
    model, _ = smollm
    calibration = kjv[0]
    with pytest.raises(ValueError, match="alpha"):
        head_modulation(model, None, calibration, alpha=-1.0)
    with pytest.raises(ValueError, match="per_layer"):
        head_modulation(model, None, calibration, per_layer=10)
    with pytest.raises(ValueError, match="mode"):
        head_modulation(model, None, calibration, mode="values")
    with pytest.raises(ValueError, match="layers"):
        head_modulation(model, None, calibration, layers=[30])
    with pytest.raises(ValueError, match="calibration"):
        head_modulation(model, None, [])
    with pytest.raises(ValueError, match="sensitivity"):
        head_modulation(model, sensitivity=torch.zeros(30, 8))
    with pytest.raises(ValueError, match="longer than"):
        head_sensitivity(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="n_last"):
        head_sensitivity(model, calibration, keep_last=2, n_last=4)
