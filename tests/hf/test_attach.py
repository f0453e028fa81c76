"""attnlab.attach on the real SmolLM2 (causal, GQA) and MiniLM (BERT encoder, padded batches)."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.hf import IncompatibleModelError, attach, attention_layers, load
from attnlab.interventions.base import Modifier
from attnlab.probes.base import CallContext, Observer

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
PAIR = ["A man is playing a guitar on the stage tonight.", "Dogs run."]


class FullRows(Observer):
    """Test observer: keeps every probability row, {layer: (B, H, Nq, Nk)} for the latest call per layer."""

    def __init__(self):
        self.maps: dict[int, torch.Tensor] = {}
        self.chunks: dict[int, list] = {}
        self.contexts: list[CallContext] = []
        self.max_rows = 0  # the most query rows in one chunk: memory stays O(chunk x T_kv)

    def observe(self, ctx, q_start, probs):
        self.max_rows = max(self.max_rows, probs.shape[2])
        self.chunks.setdefault(ctx.layer, []).append((q_start, probs.clone()))

    def layer_done(self, ctx):
        parts = self.chunks.pop(ctx.layer)
        assert [q for q, _ in parts] == sorted(q for q, _ in parts)
        self.maps[ctx.layer] = torch.cat([p for _, p in parts], dim=2)
        self.contexts.append(ctx)


class ZeroHead(Modifier):
    """Zero one head's per-head output at one layer (an output-only modifier: SDPA stays)."""

    def __init__(self, layer, head):
        self.layer, self.head = layer, head

    def modify_output(self, ctx, output):
        if ctx.layer != self.layer:
            return output
        output = output.clone()
        output[:, self.head] = 0.0
        return output


class SameProbs(Modifier):
    """An identity override of modify_probs: forces the exact chunked path, changes nothing."""

    def modify_probs(self, ctx, q_start, probs):
        return probs


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def smol_ids(smollm):
    return smollm[1](TEXT, return_tensors="pt")


@pytest.fixture(scope="module")
def pair(minilm):
    batch = minilm[1](PAIR, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    return batch


@pytest.mark.parametrize("which", ["smollm", "minilm"])
@pytest.mark.parametrize("with_observer", [False, True])
def test_detach_restores_bit_identical_outputs(which, with_observer, request):
    model, tokenizer = request.getfixturevalue(which)
    inputs = tokenizer(PAIR, return_tensors="pt", padding=True)
    before = _run(model, inputs)
    impl = model.config._attn_implementation
    att = attach(model, [FullRows()] if with_observer else [])
    assert model.config._attn_implementation == "attnlab" and att.active
    _run(model, inputs)
    att.detach()
    assert model.config._attn_implementation == impl and not att.active
    assert torch.equal(_run(model, inputs), before)
    att.detach()  # idempotent


def test_context_manager_detaches_on_error(minilm, pair):
    model, _ = minilm

    class Boom(Observer):
        def observe(self, ctx, q_start, probs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with attach(model, [Boom()]):
            _run(model, pair)
    assert model.config._attn_implementation == "sdpa"


def test_nothing_attached_is_bit_identical_to_sdpa(smollm, smol_ids):
    model, _ = smollm
    base = _run(model, smol_ids)
    with attach(model) as att:
        assert not att.exact
        assert torch.equal(_run(model, smol_ids), base)


@pytest.mark.parametrize("observe", [False, True])
def test_generate_greedy_tokens_unchanged(smollm, smol_ids, observe):
    model, tokenizer = smollm
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        plain = model.generate(**smol_ids, **kw)
        obs = FullRows()
        with attach(model, [obs] if observe else []):
            attached = model.generate(**smol_ids, **kw)
    assert torch.equal(attached, plain)
    if observe:  # the last call is one decode step: 1 query, all cached keys, at the last position
        n = plain.shape[1] - 1
        ctx = obs.contexts[-1]
        assert (ctx.n_q, ctx.n_kv, ctx.q_positions.tolist()) == (1, n, [n - 1])
        assert obs.maps[29].shape == (1, 9, 1, n)
        assert torch.equal(ctx.input_ids, plain[:, -2:-1])


def test_generate_with_a_static_cache_and_left_padding(smollm):
    model, tokenizer = smollm
    batch = tokenizer(["And God said, Let there be light", "In the"], return_tensors="pt", padding=True,
                      padding_side="left")  # the shared tokenizer keeps its own setting
    assert batch["attention_mask"][1, 0] == 0
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id, cache_implementation="static")
    obs = FullRows()
    with torch.no_grad():
        plain = model.generate(**batch, **kw)
        with attach(model, [obs]):
            attached = model.generate(**batch, **kw)
    assert torch.equal(attached, plain)
    n = batch["input_ids"].shape[1]
    first = [c for c in obs.contexts if c.layer == 0]
    # the static cache is longer than what it holds: positions come from the cache, not from T_kv
    assert [c.q_positions.tolist() for c in first] == [list(range(n)), [n], [n + 1]]
    assert first[0].n_kv > n and first[0].key_padding is not None


@pytest.mark.parametrize("chunk", [7, 256])
def test_observer_path_matches_sdpa_smollm(smollm, smol_ids, chunk):
    model, _ = smollm
    base = _run(model, smol_ids)
    obs = FullRows()
    with attach(model, [obs], chunk=chunk) as att:
        assert att.exact and att.n_layers == 30
        got = _run(model, smol_ids)
    assert (got - base).abs().max().item() < 1e-4
    n = smol_ids["input_ids"].shape[1]
    assert obs.max_rows == min(chunk, n)
    assert sorted(obs.maps) == list(range(30))
    ctx = obs.contexts[0]
    assert ctx.causal and ctx.key_padding is None and ctx.n_layers == 30 and (ctx.n_q, ctx.n_kv) == (n, n)
    assert torch.equal(ctx.q_positions, torch.arange(n)) and torch.equal(ctx.input_ids, smol_ids["input_ids"])
    p = obs.maps[3]
    assert p.shape == (1, 9, n, n) and torch.allclose(p.sum(-1), torch.ones(1, 9, n), atol=1e-5)
    assert (p.triu(1) == 0).all()  # causal: the future gets exactly 0


def test_observer_path_matches_sdpa_smollm_left_padded(smollm):
    model, tokenizer = smollm
    batch = tokenizer([TEXT, "And God said"], return_tensors="pt", padding=True, padding_side="left")
    assert batch["attention_mask"][1, 0] == 0
    keep = batch["attention_mask"].bool()
    base = _run(model, batch)
    obs = FullRows()
    with attach(model, [obs], chunk=5):
        got = _run(model, batch)
    assert (got - base)[keep].abs().max().item() < 1e-4
    ctx = obs.contexts[0]
    assert torch.equal(ctx.key_padding, keep)
    assert (obs.maps[0].permute(0, 3, 1, 2)[~keep] == 0).all()  # no query ever sees a pad key


@pytest.mark.parametrize("chunk", [3, 256])
def test_observer_path_matches_sdpa_minilm_padded(minilm, pair, chunk):
    model, _ = minilm
    base = _run(model, pair)
    obs = FullRows()
    with attach(model, [obs], chunk=chunk) as att:
        assert att.n_layers == 6
        got = _run(model, pair)
    assert (got - base).abs().max().item() < 1e-4
    ctx = obs.contexts[0]
    assert not ctx.causal and torch.equal(ctx.key_padding, pair["attention_mask"].bool())
    keys = pair["attention_mask"].bool()
    assert (obs.maps[5].permute(0, 3, 1, 2)[~keys] == 0).all()


@pytest.fixture(scope="module")
def eager_smollm():
    model, _ = load("smollm2")
    model.set_attn_implementation("eager")
    return model


def test_streamed_rows_equal_eager_attention_maps_smollm(eager_smollm, smollm, smol_ids, chunk=4):
    with torch.no_grad():
        eager = eager_smollm(**smol_ids, output_attentions=True).attentions
    obs = FullRows()
    with attach(smollm[0], [obs], chunk=chunk):
        _run(smollm[0], smol_ids)
    for layer, ref in enumerate(eager):
        assert (obs.maps[layer] - ref).abs().max().item() < 1e-5, layer


def test_detach_restores_an_eager_model(eager_smollm, smol_ids):
    before = _run(eager_smollm, smol_ids)
    with attach(eager_smollm, [FullRows()]):
        _run(eager_smollm, smol_ids)
    assert eager_smollm.config._attn_implementation == "eager"
    assert torch.equal(_run(eager_smollm, smol_ids), before)


def test_streamed_rows_equal_eager_attention_maps_minilm(minilm, pair):
    eager, _ = load("minilm")
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref = eager(**pair, output_attentions=True).attentions
    obs = FullRows()
    with attach(minilm[0], [obs], chunk=4):
        _run(minilm[0], pair)
    keys = pair["attention_mask"].bool()
    for layer in range(6):
        got = obs.maps[layer]
        # eager gives pad keys exp(min - max) ~ 0 rather than exactly 0
        assert (got - ref[layer]).abs().max().item() < 1e-5, layer
        assert (got.permute(0, 3, 1, 2)[~keys] == 0).all()


def test_zeroing_one_head_output_changes_only_that_head_of_that_layer(smollm, smol_ids):
    model, _ = smollm
    layer, head, d = 5, 4, 64
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        m.o_proj.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].clone()))
        for i, m in attention_layers(model).items()
    ]
    try:
        _run(model, smol_ids)
        base = dict(captured)
        with attach(model, modifiers=[ZeroHead(layer, head)]) as att:
            assert not att.exact  # output-only modifiers keep SDPA
            _run(model, smol_ids)
        changed = dict(captured)
    finally:
        for h in hooks:
            h.remove()
    for i in range(layer):
        assert torch.equal(changed[i], base[i])
    heads_before = base[layer].unflatten(-1, (9, d))
    heads_after = changed[layer].unflatten(-1, (9, d))
    assert (heads_after[:, :, head] == 0).all() and (heads_before[:, :, head] != 0).any()
    others = [h for h in range(9) if h != head]
    assert torch.equal(heads_after[:, :, others], heads_before[:, :, others])
    assert not torch.equal(changed[layer + 1], base[layer + 1])  # later layers see the change


def test_output_modifier_on_exact_path_too(smollm, smol_ids):
    model, _ = smollm
    with attach(model, [FullRows()], [ZeroHead(2, 0)]):
        a = _run(model, smol_ids)
    with attach(model, modifiers=[ZeroHead(2, 0)]):
        b = _run(model, smol_ids)
    assert (a - b).abs().max().item() < 1e-4 and (a - _run(model, smol_ids)).abs().max().item() > 1e-3


def test_prob_modifier_takes_the_exact_path(minilm, pair):
    model, _ = minilm
    base = _run(model, pair)
    with attach(model, modifiers=[SameProbs()]) as att:
        assert att.exact
        assert (_run(model, pair) - base).abs().max().item() < 1e-4


def test_layer_indices(smollm, minilm):
    assert list(attention_layers(smollm[0])) == list(range(30))
    assert [m.layer_idx for m in attention_layers(smollm[0]).values()] == list(range(30))
    assert list(attention_layers(minilm[0])) == list(range(6))


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "8"])
def test_bad_chunk(minilm, chunk):
    with pytest.raises(ValueError, match="chunk"):
        attach(minilm[0], chunk=chunk)
    assert minilm[0].config._attn_implementation == "sdpa"


def test_bad_observers_and_modifiers(minilm):
    with pytest.raises(ValueError, match=r"observers\[1\]"):
        attach(minilm[0], [FullRows(), object()])
    with pytest.raises(ValueError, match=r"modifiers\[0\]"):
        attach(minilm[0], modifiers=[FullRows()])
    with pytest.raises(ValueError, match="observers"):
        attach(minilm[0], observers=42)
    assert minilm[0].config._attn_implementation == "sdpa"


def test_single_observer_is_accepted(minilm, pair):
    obs = FullRows()
    with attach(minilm[0], obs) as att:
        _run(minilm[0], pair)
    assert att.observers == (obs,) and len(obs.maps) == 6


def test_attaching_twice_is_refused(minilm):
    with attach(minilm[0]):
        with pytest.raises(ValueError, match="already attached"):
            attach(minilm[0])
    with attach(minilm[0]):  # fine again after detach
        pass


def test_models_without_attention_interface_are_refused():
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(IncompatibleModelError, match="AttentionInterface"):
        attach(bloom)
    with pytest.raises(IncompatibleModelError, match="PreTrainedModel"):
        attach(torch.nn.Linear(4, 4))


def test_exported_at_top_level():
    assert attnlab.attach is attach


def test_bfloat16_model_observers_get_float32(pair):
    model, _ = load("minilm", dtype=torch.bfloat16)
    base = _run(model, pair)
    obs = FullRows()
    with attach(model, [obs], chunk=4):
        got = _run(model, pair)
    assert got.dtype == torch.bfloat16 and obs.maps[0].dtype == torch.float32
    assert (got.float() - base.float()).abs().max().item() < 0.1  # bf16 rounding only
    assert torch.allclose(obs.maps[0].sum(-1), torch.ones(()), atol=1e-5)
