"""Head GEMV alone: Q8 (int8 head) vs Q6 (the Q6_K recipe) on Gemma's head shape, interleaved."""
import json, os, sys, time, torch
torch.set_num_threads(2)
from ember.kernels.ops import CpuKernels, pack_q8
from ember.formats.blocks import Q8Blocks
from ember.formats.q6 import pack_q6
from ember.layers.q6_head import q6_gemm, q6_quantize
k = CpuKernels.load(None, 2)
n, kk = 262144, 640
w = torch.randn(n, kk) * 0.02
q8 = Q8Blocks.quantize(w); q8p, q8d = pack_q8(q8.q, q8.d)
b6 = q6_quantize(k, w); q6p, q6d = pack_q6(b6)
del w
x = torch.randn(1, kk)
res = {"q8": [], "q6": []}
for _ in range(3):
    for name in ("q8", "q6"):
        f = (lambda: k.q8_gemm(x, q8p, q8d)) if name == "q8" else (lambda: q6_gemm(k, x, q6p, q6d, b6.sb))
        for _ in range(3): f()
        t = time.perf_counter()
        for _ in range(20): f()
        res[name].append((time.perf_counter() - t) / 20 * 1e3)
mb = {"q8": (q8p.numel() + q8d.numel() * 4) / 1e6, "q6": (q6p.numel() + q6d.numel() * 4) / 1e6}
out = {"head_ms_best": {kk_: min(v) for kk_, v in res.items()}, "head_mb": mb,
       "gbs": {kk_: mb[kk_] / 1e3 / (min(v) / 1e3) for kk_, v in res.items()},
       "loadavg": os.getloadavg(), "isa": k.isa}
print(json.dumps(out, indent=1))
path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/issue9/gemma3-q6head/head_micro.json"
json.dump(out, open(path, "w"), indent=2)
