import ctypes, time, sys, statistics
import numpy as np
from ember.edge.llm import EdgeLLM
from ember.edge.model import BLOCK_SIZE, _ptr
ctxs = [int(c) for c in sys.argv[1].split(",")]
llm = EdgeLLM("smollm2-135m-instruct", max_context=max(ctxs) + 32)
m = llm.model; a = m.arch
rng = np.random.default_rng(0)
m.forward(rng.integers(100, 20000, max(ctxs)), 0)
fn = m._lib.decode_layers_few
fn.argtypes = m._lib.decode_layers.argtypes; fn.restype = None
junk = np.ones(96 << 17)
def runner(ctx):
    x0 = rng.standard_normal((1, a.hidden)).astype(np.float32) * 0.1
    x = x0.copy()
    positions = np.arange(ctx, ctx + 1, dtype=np.int64)
    cos, sin = m.rope(positions)
    width = -(-(ctx + 1) // BLOCK_SIZE)
    tables = np.ascontiguousarray(m.block_table[:width][None, :])
    lens = positions + 1
    def run():
        x[:] = x0
        fn(_ptr(x), 1, ctypes.addressof(m._structs), a.num_layers, ctypes.addressof(m._shape),
           _ptr(cos), _ptr(sin), _ptr(positions), _ptr(tables), width, 1, _ptr(lens), m.num_threads)
    return run
runs = {c: runner(c) for c in ctxs}
times = {c: [] for c in ctxs}
for rep in range(30):
    for c in ctxs:
        junk.sum(); t0 = time.perf_counter(); runs[c](); times[c].append(time.perf_counter() - t0)
base = statistics.median(times[ctxs[0]])
for c in ctxs:
    med = statistics.median(times[c]); kv = c * 3 * 64 * 2 * 2 * 30 / 1e6
    print(f"ctx {c:5d}: {1e3*med:.2f} ms  (+{1e3*(med-base):.2f} over ctx {ctxs[0]}; KV {kv:.1f} MB)")
