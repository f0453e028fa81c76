"""Probe (session 6): can the dense core also take each group's right edge, as a bottom-right causal mask
(row r of a 128-row group sees run keys t <= r + L - 128)? Checks cuDNN's and flash's is_causal alignment on
overlapping views against an explicit mask, and times them beside the plain core."""
import os, sys
import torch
from triton.testing import do_bench
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from attnlab.core.patterns import sliding_window
from attnlab.kernels import dense_core as dc, triton_local as tlo
from attnlab.kernels.grouped_dense import fold
DEV, H, D, DT = "cuda", 16, 128, torch.bfloat16
def ms(f): return do_bench(f, warmup=25, rep=200, return_mode="median")
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
for n, p in [(32768, sliding_window(2048)), (32768, sliding_window(2048, causal=True))]:
    q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=DT) for _ in range(3))
    plan = tlo.cached_plan(p, n, n, (128,), (128,), torch.device("cpu"))
    c = dc.core(plan)
    hi = plan.bounds[1].long()
    s0 = c.first * 128
    L = int(hi[s0]) + 127 - c.k_start
    cnt = c.count
    while (c.first + cnt - 1) * 128 + c.k_start - s0 + L > n:  # keep the runs inside the tensor
        cnt -= 1
    qv = fold(q, s0, 128, cnt, 128); kv = fold(k, c.k_start, c.k_step, cnt, L); vv = fold(v, c.k_start, c.k_step, cnt, L)
    r = torch.arange(128, device=DEV)[:, None]; t = torch.arange(L, device=DEV)[None, :]
    br = t <= r + L - 128
    ref = torch.nn.functional.scaled_dot_product_attention(qv[:8], kv[:8], vv[:8], attn_mask=br)
    # the window itself on the first groups: row s0+r sees [lo, hi) -> compare with the mask
    lo = plan.bounds[0].long()
    ok_geo = all(int(hi[s0 + i]) == int(hi[s0]) + i for i in range(128)) and int(lo[s0 + 127]) <= c.k_start
    print(f"N={n} {p}: core {c}, L={L}, groups {cnt}, slope-1 right edge and core start inside: {ok_geo}", flush=True)
    kc = fold(k, c.k_start, c.k_step, cnt, c.k_len); vc = fold(v, c.k_start, c.k_step, cnt, c.k_len)
    print(f"  plain core (no mask, {c.k_len} keys) {ms(lambda: dc._cudnn(qv, kc, vc, D ** -0.5)):.3f} ms", flush=True)
    for name, fn in [("cudnn", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qv, kv, vv, None, True, 0.0, True, False, scale=D ** -0.5)[:2]),
                     ("flash", lambda: torch.ops.aten._scaled_dot_product_flash_attention(qv, kv, vv, 0.0, True, False, scale=D ** -0.5)[:2])]:
        try:
            o, l = fn()
            print(f"  {name} is_causal: {ms(fn):.3f} ms; err vs bottom-right mask {rel(o[:8], ref):.2e}; "
                  f"lse shape {tuple(l.shape)}", flush=True)
        except Exception as e:
            print(f"  {name} is_causal FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    del q, k, v; torch.cuda.empty_cache()
