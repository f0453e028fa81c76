"""H200: the memory roofline of issue 2's short-window cases.

Copies of 256 MB (one 16K x 16 heads x D=128 bf16 tensor each for q, k, v, o: what any attention kernel must
at least read and write there) through torch: read + write bandwidth, so a case whose FLOPs at SDPA's rate
take less time than its bytes at this bandwidth is memory-bound, whatever the kernel.

    OUT=outdir python3 benchmarks/h200_bandwidth.py   # writes outdir/bandwidth.json
"""
import json
import os

import torch
from triton.testing import do_bench

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
x = torch.randn(2, 16, 16384, 128, device="cuda", dtype=torch.bfloat16)  # q and k: 128 MB read
y = torch.empty_like(x)  # 128 MB written
t = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
res = {"gpu": torch.cuda.get_device_name(), "bytes": 2 * x.numel() * x.element_size(), "copy_ms": t,
       "tb_per_s": 2 * x.numel() * x.element_size() / t / 1e9}
print(res)
json.dump(res, open(os.path.join(OUT, "bandwidth.json"), "w"), indent=1)
