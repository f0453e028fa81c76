"""Packed multi-group layers on CUDA: the varlen kernels (flash for fp16 / bf16, efficient attention with
cu_seqlens for float32) against float64, a packed layer over decode steps against the float64 row model,
and SmolLM2 decoding on the GPU: packed by default, no host syncs, no more ops per step than full."""
from __future__ import annotations

import copy

import pytest
import torch

from attnlab.kv.packed import _segment_attention_cpu, kernel_ok, segment_attention
from attnlab.tasks import make_needle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_kernel_with_gaps_matches_float64(dtype):
    """Rows of different lengths and slack (zero-query gap segments), 3 queries per row, D = 64."""
    g = torch.Generator().manual_seed(0)
    D, rep = 64, 3
    lens = [(5, 5), (3, 0), (700, 64), (1, 9), (130, 1)]  # (entries, slack after them)
    S = sum(n + gap for n, gap in lens)
    k = torch.randn(S, 1, D, generator=g, dtype=torch.float64)
    v = torch.randn(S, 1, D, generator=g, dtype=torch.float64)
    q = torch.randn(len(lens) * rep, 1, D, generator=g, dtype=torch.float64)
    cu_k, cu_q, start = [], [], 0
    for r, (n, gap) in enumerate(lens):
        cu_k += [start, start + n]
        cu_q += [r * rep, (r + 1) * rep]
        start += n + gap
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    want = _segment_attention_cpu(q, k, v, cu_q, cu_k, rep, 700, 0.125)
    dev = torch.device("cuda")
    got = segment_attention(*(t.to(dev, dtype) for t in (q, k, v)), cu_q.to(dev), cu_k.to(dev), rep, 700, 0.125)
    assert (got.double().cpu() - want).abs().max().item() <= TOL[dtype]
    assert kernel_ok(dev, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_layer_on_cuda_matches_float64_rows(dtype):
    """Appends, rings that evict, growth past the reserve, batch 3, GQA rep 3, on the GPU (packed by default)."""
    from test_packed import GivenRings, RowModel, random_plans

    from attnlab.kv import RaggedLayer

    g = torch.Generator().manual_seed(3)
    B, H_kv, rep, T, D = 3, 3, 3, 40, 64
    dev = torch.device("cuda")
    k, v = torch.randn(B, H_kv, T, D, generator=g), torch.randn(B, H_kv, T, D, generator=g)
    plans = random_plans(g, B, H_kv, T)
    layer = RaggedLayer(GivenRings(plans=plans, n_sink=2), 0, 1, reserve=3)
    layer.update(k.to(dev, dtype), v.to(dev, dtype))
    layer.set_valid(None, B, T)
    layer.compress()
    assert layer.packed is not None
    model = RowModel(k.to(dtype).float(), v.to(dtype).float(), plans, 2)
    for step in range(8):
        nk, nv = torch.randn(B, H_kv, 1, D, generator=g), torch.randn(B, H_kv, 1, D, generator=g)
        q = torch.randn(B, H_kv * rep, 1, D, generator=g)
        layer.update(nk.to(dev, dtype), nv.to(dev, dtype))
        model.step(nk.to(dtype).float(), nv.to(dtype).float(), T + step)
        got = layer.attend(q.to(dev, dtype), D ** -0.5).double().cpu()
        want = model.attend(q.to(dtype).float(), D ** -0.5)
        assert (got - want).abs().max().item() <= TOL[dtype], step


def test_smollm2_decode_on_cuda_is_packed_with_fewer_ops_than_full(smollm):
    """MoA / Task-KV (synthetic calibration: several groups per layer) on CUDA: packed by default (auto), no
    host sync beyond full's, ops per step < full's, and the group path's tokens (float32)."""
    from test_decode_ops import last_decode_step, policies

    model, tok = smollm
    gpu = copy.deepcopy(model).to("cuda")
    ids = torch.tensor([make_needle(tok, length=128, n_samples=1, seed=2)[0].input_ids], device="cuda").expand(2, -1).contiguous()
    pols = policies(gpu)
    full, _, _ = last_decode_step(gpu, ids, pols["full"], None, new=6)
    print(f"full: {full.ops} ops/step, {full.syncs} syncs")
    for name in ("moa", "task_kv"):
        c, cache, out = last_decode_step(gpu, ids, pols[name], None, new=6)
        c_group, group_cache, out_group = last_decode_step(gpu, ids, pols[name], False, new=6)
        print(f"{name}: packed {c.ops} ops/step ({c.syncs} syncs, {cache.packed_layers()} packed layers), "
              f"group path {c_group.ops} ops/step; by op: {dict(c.by_op.most_common(12))}")
        assert cache.packed_layers() == sum(layer.n_groups > 1 for layer in group_cache.layers) > 0
        # generate's own stopping check reads one value per step (eq, sum, _local_scalar_dense): full has it too
        assert c.syncs <= full.syncs, c.by_op
        assert c.ops < full.ops < c_group.ops, (c.ops, full.ops, c_group.ops)
        assert "index_fill_" not in c.by_op  # positions are written lazily
        assert torch.equal(out, out_group), name
