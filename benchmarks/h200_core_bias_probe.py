"""Probe (session 6): can cuDNN run a 1-D window's whole union per query tile, with the band as an additive
bias broadcast over the tiles (stride 0), on overlapping key views? Times vs the core without bias."""
import os, sys, time
import torch
from triton.testing import do_bench
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import attnlab
from attnlab.core.patterns import sliding_window
from attnlab.kernels.grouped_dense import fold
from torch.nn.attention import sdpa_kernel, SDPBackend
DEV, H, D, DT = "cuda", 16, 128, torch.bfloat16
def ms(f): return do_bench(f, warmup=25, rep=200, return_mode="median")
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
for n, w in [(32768, 2048), (16384, 1024), (32768, 4096)]:
    p = sliding_window(w)
    q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=DT) for _ in range(3))
    sd = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    plain = attnlab.attention(q, k, v, pattern=p)
    tp = ms(lambda: attnlab.attention(q, k, v, pattern=p))
    ideal = 1 / p.density(n, n)
    m = p.mask(n, n, device=DEV)
    # interior tiles: union of the tile's windows starts at s - lo_off, length L (tile-aligned to 128)
    qt = 128
    rows = m[8 * qt: 9 * qt]  # a tile well inside
    cols = rows.any(0).nonzero().flatten()
    k0, k1 = int(cols[0]), int(cols[-1]) + 1
    L = -(-(k1 - k0) // 64) * 64
    off = k0 - 8 * qt
    first = next(t for t in range(n // qt) if t * qt + off >= 0)
    last = max(t for t in range(n // qt) if t * qt + off + L <= n)
    cnt = last - first + 1
    band = m[first * qt:(first + 1) * qt, first * qt + off: first * qt + off + L]
    bias = torch.zeros(qt, L, device=DEV, dtype=DT).masked_fill(~band, float("-inf"))
    qv = fold(q, first * qt, qt, cnt, qt); kv = fold(k, first * qt + off, qt, cnt, L); vv = fold(v, first * qt + off, qt, cnt, L)
    for name, b in [("bias bf16 stride0", bias.expand(cnt, H, qt, L)), ("bool mask stride0", band.expand(cnt, H, qt, L))]:
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(qv, kv, vv, attn_mask=b)
                o = f(); t = ms(f)
            ref = plain[:, :, first * qt:(last + 1) * qt].reshape(H, cnt, qt, D).transpose(0, 1)
            print(f"N={n} w={w}: {name}: cuDNN core over {cnt} tiles x {L} keys {t:.3f} ms; err vs plain {rel(o, ref):.2e}; "
                  f"SDPA dense {sd:.3f}, plain Triton {tp:.3f} ({sd / tp / ideal:.3f}); core-only frac if borders free "
                  f"{sd / t / ideal:.3f}", flush=True)
        except Exception as e:
            print(f"N={n} w={w}: {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    try:
        t = ms(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qv, kv, vv, bias.expand(cnt, H, qt, L), False, 0.0, False, False, scale=D ** -0.5))
        print(f"N={n} w={w}: aten cudnn op with bias {t:.3f} ms", flush=True)
    except Exception as e:
        print(f"N={n} w={w}: aten cudnn op with bias FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    del m, q, k, v, plain
    torch.cuda.empty_cache()
