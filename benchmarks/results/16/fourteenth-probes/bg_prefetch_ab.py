import ctypes, time, sys, statistics
import numpy as np
sys.path.insert(0, 'benchmarks')
from ember.edge.llm import EdgeLLM
from ember.edge.model import BLOCK_SIZE, _ptr
ctxs = [int(c) for c in sys.argv[1].split(",")] if len(sys.argv) > 1 else [4096]
settings = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0, 24]
llm = EdgeLLM("smollm2-135m-instruct", max_context=max(ctxs) + 32)
m = llm.model; a = m.arch
flag = ctypes.c_int.in_dll(m._lib, "ember_bg_max_per_step")
rng = np.random.default_rng(0)
m.forward(rng.integers(100, 20000, max(ctxs)), 0)
fn = m._lib.decode_layers_few
fn.argtypes = m._lib.decode_layers.argtypes; fn.restype = None
for ctx in ctxs:
    x0 = rng.standard_normal((1, a.hidden)).astype(np.float32) * 0.1
    x = x0.copy()
    positions = np.arange(ctx, ctx + 1, dtype=np.int64)
    cos, sin = m.rope(positions)
    width = -(-(ctx + 1) // BLOCK_SIZE)
    tables = np.ascontiguousarray(m.block_table[:width][None, :])
    lens = positions + 1
    junk = np.ones(96 << 17)  # 96 MB
    def run():
        x[:] = x0
        fn(_ptr(x), 1, ctypes.addressof(m._structs), a.num_layers, ctypes.addressof(m._shape),
           _ptr(cos), _ptr(sin), _ptr(positions), _ptr(tables), width, 1, _ptr(lens), m.num_threads)
    times = {s: [] for s in settings}; outs = {}
    for rep in range(30):
        for s in settings:
            flag.value = s
            junk.sum()  # evict caches as a real step's other work would
            t0 = time.perf_counter(); run(); times[s].append(time.perf_counter() - t0)
            outs[s] = x.copy()
    same = all(np.array_equal(outs[settings[0]], outs[s]) for s in settings)
    print(f"ctx {ctx}: " + "  ".join(f"bg={s}: median {1e3*statistics.median(times[s]):.2f} ms p25 {1e3*sorted(times[s])[7]:.2f}" for s in settings), "same bits:", same, flush=True)
