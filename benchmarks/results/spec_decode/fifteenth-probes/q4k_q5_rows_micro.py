import time, torch, sys
from ember.kernels.ops import CpuKernels, pack_q5, pack_q4k
torch.manual_seed(0)
k = CpuKernels.load(None, num_threads=2)
n, K = 2048, 640
q5 = torch.randint(-16, 16, (n, K), dtype=torch.int8); d5 = (torch.rand(n, K // 32) * 0.01).half().float()
p5 = pack_q5(q5, d5)
n4, K4 = 4096, 768  # K multiple of 256 for Q4K
q4 = torch.randint(0, 16, (n4, K4), dtype=torch.uint8); sc = torch.randint(0, 64, (n4, K4 // 32), dtype=torch.uint8)
mn = torch.randint(0, 64, (n4, K4 // 32), dtype=torch.uint8); dk = torch.rand(n4, K4 // 256) * 1e-3
p4k = pack_q4k(q4, sc, mn, dk, dk)
res = []
for M in (1, 2, 4, 8, 17):
    for name, fn, x in (("q5", lambda x: k.q5_gemm(x, p5), torch.randn(M, K)), ("q4k", lambda x: k.q4k_gemm(x, *p4k), torch.randn(M, K4))):
        for _ in range(20): fn(x)
        ts = []
        for _ in range(200):
            t = time.perf_counter(); fn(x); ts.append(time.perf_counter() - t)
        ts.sort(); res.append(f"{name} M={M}: {ts[len(ts)//4]*1e6:.0f}us")
print("  ".join(res))
